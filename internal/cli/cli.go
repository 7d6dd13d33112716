// Package cli holds what both Lanyard binaries need around their commands:
// the root logger, signal handling and the version string.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/hashicorp/go-hclog"
)

// ExitConfig is the exit status of `run` on an invalid config or policy
// (sysexits' EX_CONFIG). The systemd units name it in
// RestartPreventExitStatus=: restarting cannot fix a file.
const ExitConfig = 78

// Version is the binary's version, from the module build info.
func Version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// NewLogger makes a binary's one root logger.
func NewLogger(name, level, format string, out io.Writer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      hclog.LevelFromString(level),
		JSONFormat: format == "json",
		Output:     out,
	})
}

// SignalContext is canceled on SIGINT or SIGTERM: shutdown means the
// context ends.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// Fatalf prints a one-line error and exits with code.
func Fatalf(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(code)
}

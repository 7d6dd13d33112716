// Package cli holds what both Lanyard binaries need around their commands:
// the root logger, signal handling and the version string.
package cli

import (
	"context"
	"errors"
	"flag"
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

// ParseFlags parses args with fs, letting flags follow positional arguments
// ("validate jwt TOKEN --audience a"), and returns the positional ones in
// order. Everything after "--" is positional. On an error fs has already
// printed its usage or the problem; pass the error to FlagExit.
func ParseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if i := len(args) - len(rest) - 1; i >= 0 && args[i] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// FlagExit is the exit status for a ParseFlags error: 0 when help was
// asked for (--help, -h: help is not a failure), else code.
func FlagExit(err error, code int) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return code
}

// SubUsage ends a command whose subcommand is missing or unknown: with
// --help, -h or help as the subcommand it prints usage and exits 0 (help
// is not a failure), else it prints usage as an error and exits 2.
func SubUsage(args []string, usage string) {
	if len(args) >= 2 && (args[1] == "--help" || args[1] == "-h" || args[1] == "help") {
		fmt.Println(usage)
		os.Exit(0)
	}
	Fatalf(2, "%s", usage)
}

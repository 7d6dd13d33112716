package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/lanyard-dev/lanyard/internal/execfeed"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const execUsage = "usage: lanyard-agent exec [--socket PATH] [--spiffe-id ID] [--signal HUP|none|NAME] [--jwt-audience A]... [--timeout 30s] [--private-mount auto|require|off] -- CMD ARGS..."

// execCommand runs CMD with its identity in memory-only files
// (internal/execfeed) and returns CMD's exit status, or exec's own on a
// failure of its own (printed on stderr: the codes cannot be told apart).
func execCommand(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, execUsage)
		fs.PrintDefaults()
	}
	socket := fs.String("socket", "", "Workload API socket (default $SPIFFE_ENDPOINT_SOCKET or "+defaultSocket+")")
	rawID := fs.String("spiffe-id", "", "feed this SVID (default: the first the Workload API serves)")
	rawSignal := fs.String("signal", "HUP", "signal sent to CMD after each rotation of the files, or none")
	var aud audiences
	fs.Var(&aud, "jwt-audience", "also keep a JWT-SVID for this audience in $LANYARD_JWT_FILE (repeat for several)")
	timeout := fs.Duration("timeout", execfeed.DefaultTimeout, "give up when no SVID came within this long (CMD is not started)")
	rawMount := fs.String("private-mount", "auto", "auto: files in a private mount namespace when possible; require: or fail; off: a tmpfs directory")
	// Flags end at "--" or at the command: its own flags are its own.
	if err := fs.Parse(args); err != nil {
		return cli.FlagExit(err, execfeed.ExitUsage)
	}
	cmdArgs := fs.Args()
	bad := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "exec: "+format+"\n%s\n", append(a, execUsage)...)
		return execfeed.ExitUsage
	}
	if len(cmdArgs) == 0 {
		return bad("no command")
	}
	if *timeout <= 0 {
		return bad("--timeout must be positive")
	}
	sig, err := execfeed.ParseSignal(*rawSignal)
	if err != nil {
		return bad("%v", err)
	}
	mode, err := execfeed.ParseMountMode(*rawMount)
	if err != nil {
		return bad("%v", err)
	}
	var id spiffeid.ID
	if *rawID != "" {
		if id, err = spiffeid.FromString(*rawID); err != nil {
			return bad("--spiffe-id %q: %v", *rawID, err)
		}
	}
	cfg := execfeed.Config{
		Addr: socketAddr(*socket), ID: id, Signal: sig, JWTAudiences: aud,
		Timeout: *timeout, Mount: mode, Command: cmdArgs,
		Log: cli.NewLogger("lanyard-agent exec", "info", "", stderr),
	}
	code, err := execfeed.Run(context.Background(), cfg)
	if err != nil {
		fmt.Fprintf(stderr, "lanyard-agent exec: %v\n", err)
		if errors.Is(err, execfeed.ErrBadConfig) {
			fmt.Fprintln(stderr, execUsage)
		}
	}
	return code
}

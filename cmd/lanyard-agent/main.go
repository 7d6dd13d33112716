// Command lanyard-agent is Lanyard's per-host agent, and the SRE's tool to
// ask it questions.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/lanyard-dev/lanyard/internal/execfeed"
	"github.com/lanyard-dev/lanyard/internal/sdnotify"
	"golang.org/x/sync/errgroup"
)

const usage = `usage: lanyard-agent <command> [flags]

commands:
  run --config FILE                      run the agent
  fetch x509 [--socket PATH]             fetch X.509-SVIDs from the Workload API as this process
  fetch jwt --audience A [--spiffe-id ID] [--socket PATH]
                                         fetch JWT-SVIDs for audience A as this process (prints the token)
  validate jwt --audience A [--socket PATH] TOKEN|-
                                         ask the agent whether TOKEN is a valid JWT-SVID for A
  status [--json] [--admin-socket PATH]  is this host healthy, and if not, why (exit 0 healthy, 1 degraded, 2 unhealthy)
  healthcheck [--admin-socket PATH]      exit code only, as status
  explain PID [--json]                   why PID does or does not get an identity (exit 0 some entry matches, 1 none, 2 error)
  exec [--socket PATH] [--spiffe-id ID] [--signal HUP|none|NAME] [--jwt-audience A]... [--timeout 30s] -- CMD ARGS...
                                         run CMD with its SVID in $LANYARD_CERT_FILE, $LANYARD_KEY_FILE, $LANYARD_BUNDLE_FILE
                                         (memory only, replaced and signalled on rotation); exit status is CMD's
  tpm info --config FILE                 show the TPM's EK SHA-256, manufacturer and EK certificate
  version                                print the version
`

func main() {
	args := os.Args[1:]
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	switch args[0] {
	case "run":
		run(args[1:])
	case "fetch":
		switch {
		case len(args) >= 2 && args[1] == "x509":
			os.Exit(fetchX509(args[2:], os.Stdout, os.Stderr))
		case len(args) >= 2 && args[1] == "jwt":
			os.Exit(fetchJWT(args[2:], os.Stdout, os.Stderr))
		}
		cli.SubUsage(args, "usage: lanyard-agent fetch x509|jwt [flags]")
	case "validate":
		if len(args) < 2 || args[1] != "jwt" {
			cli.SubUsage(args, "usage: lanyard-agent validate jwt --audience A [--socket PATH] TOKEN|-")
		}
		os.Exit(validateJWT(args[2:], os.Stdin, os.Stdout, os.Stderr))
	case "status":
		os.Exit(status(args[1:], os.Stdout, os.Stderr))
	case "explain":
		os.Exit(explain(args[1:], os.Stdout, os.Stderr))
	case "healthcheck":
		os.Exit(healthcheck(args[1:], os.Stderr))
	case "exec":
		os.Exit(execCommand(args[1:], os.Stderr))
	case execfeed.StageArg:
		os.Exit(execfeed.Stage(args[1:]))
	case "tpm":
		if len(args) < 2 || args[1] != "info" {
			cli.SubUsage(args, "usage: lanyard-agent tpm info --config FILE")
		}
		os.Exit(tpmInfo(args[2:], os.Stdout, os.Stderr))
	case "version", "--version":
		fmt.Println("lanyard-agent", cli.Version())
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n%s", args[0], usage)
		os.Exit(2)
	}
}

func run(args []string) {
	// Before anything holds a key: no core file or ptrace may expose the
	// daemon's memory. Only the daemons: a non-dumpable CLI process (fetch)
	// would need CAP_SYS_PTRACE in the agent to be attested.
	if err := cli.Harden(); err != nil {
		cli.Fatalf(1, "%v", err)
	}
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	path := fs.String("config", "", "agent config file (HCL)")
	fs.Parse(args)
	if *path == "" {
		cli.Fatalf(2, "run: --config is required")
	}
	cfg, err := agent.LoadRunConfig(*path)
	if err != nil {
		cli.Fatalf(cli.ExitConfig, "lanyard-agent: invalid config:\n%v", err)
	}
	log := cli.NewLogger("lanyard-agent", cfg.LogLevel, cfg.LogFormat, os.Stderr)
	ctx, stop := cli.SignalContext()
	defer stop()
	a := agent.New(cfg, log)
	notify := sdnotify.FromEnv(log.Named("sdnotify"))
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.Run(ctx) })
	g.Go(func() error { return notify.Run(ctx, notifyDaemon(a, strings.Join(cfg.SignerAddresses, ", "))) })
	if err := g.Wait(); err != nil {
		log.Error("agent stopped", "error", err)
		os.Exit(1)
	}
}

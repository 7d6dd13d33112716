// Command lanyard-signer is Lanyard's upstream signer.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/lanyard-dev/lanyard/internal/sdnotify"
	"github.com/lanyard-dev/lanyard/signer"
	"golang.org/x/sync/errgroup"
)

const usage = `usage: lanyard-signer <command> [flags]

commands:
  run --config FILE            run the signer
  policy check --config FILE   validate the policy named by the config (exit 0 when valid)
  policy apply FILE --config F write FILE as the tier's next policy revision (with etcd)
  policy show --config FILE    the policy revision in force
  replica list|forget          the replicas of a tier (lanyard-signer replica --help)
  bundle --config FILE [--jwt] print the trust bundle file the signer wrote (PEM),
                               or with --jwt its JWT-SVID keys (JWKS)
  status [--json]              the running signer's health: address, bundle
                               sequence, CAs, agents connected and known, revocations
  node list|revoke|unrevoke    the node registry and node revocation
                               (lanyard-signer node --help)
  token list|revoke            JWT-SVID revocation, by jti or SPIFFE ID
                               (lanyard-signer token --help)
  version                      print the version

status, node, token, policy apply/show and replica talk to the signer's root-only admin socket: run them as
root, with --config FILE or --admin-socket PATH.
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
	case "policy":
		os.Exit(policyCmd(args[1:], os.Stdout, os.Stderr))
	case "replica":
		os.Exit(replicaCmd(args[1:], os.Stdout, os.Stderr))
	case "bundle":
		bundle(args[1:])
	case "status":
		os.Exit(statusCmd(args[1:], os.Stdout, os.Stderr))
	case "node":
		os.Exit(nodeCmd(args[1:], os.Stdout, os.Stderr))
	case "token":
		os.Exit(tokenCmd(args[1:], os.Stdout, os.Stderr))
	case "version", "--version":
		fmt.Println("lanyard-signer", cli.Version())
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n%s", args[0], usage)
		os.Exit(2)
	}
}

func configFlag(name string, args []string) string {
	fs := flag.NewFlagSet(name, flag.ExitOnError)
	path := fs.String("config", "", "signer config file (HCL)")
	fs.Parse(args)
	if *path == "" {
		cli.Fatalf(2, "%s: --config is required", name)
	}
	return *path
}

func run(args []string) {
	// Before anything holds a key: no core file or ptrace may expose the
	// daemon's memory. Only the daemons: a non-dumpable CLI process (fetch)
	// would need CAP_SYS_PTRACE in the agent to be attested.
	if err := cli.Harden(); err != nil {
		cli.Fatalf(1, "%v", err)
	}
	cfg, err := signer.LoadConfig(configFlag("run", args))
	if err != nil {
		cli.Fatalf(cli.ExitConfig, "lanyard-signer: invalid config:\n%v", err)
	}
	log := cli.NewLogger("lanyard-signer", cfg.LogLevel, cfg.LogFormat, os.Stderr)
	s, err := signer.New(cfg, log)
	if err != nil {
		// The policy, or the CA state an operator must fix.
		cli.Fatalf(cli.ExitConfig, "lanyard-signer: %v", err)
	}
	ctx, stop := cli.SignalContext()
	defer stop()
	notify := sdnotify.FromEnv(log.Named("sdnotify"))
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.Run(ctx) })
	g.Go(func() error { return notify.Run(ctx, notifyDaemon(s, cfg.ListenAddress)) })
	g.Go(func() error { return reloadOnHangup(ctx, s) })
	if err := g.Wait(); err != nil {
		log.Error("signer stopped", "error", err)
		os.Exit(1)
	}
}

func bundle(args []string) {
	fs := flag.NewFlagSet("bundle", flag.ExitOnError)
	path := fs.String("config", "", "signer config file (HCL)")
	jwt := fs.Bool("jwt", false, "print the JWT-SVID signing keys (JWKS, public) instead of the CAs")
	fs.Parse(args)
	if *path == "" {
		cli.Fatalf(2, "bundle: --config is required")
	}
	cfg, err := signer.LoadConfig(*path)
	if err != nil {
		cli.Fatalf(1, "%v", err)
	}
	file := cfg.BundlePath
	if *jwt {
		// The state file is a JWKS with "use": "jwt-svid" per key; its
		// extra keep_until members are ignored by JWKS readers.
		file = filepath.Join(cfg.StateDir, signer.JWTStateFile)
	}
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		cli.Fatalf(1, "no bundle at %s: is the signer running?", file)
	} else if err != nil {
		cli.Fatalf(1, "%v", err)
	}
	os.Stdout.Write(b)
}

// count writes n with the noun in the number it needs.
func count(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

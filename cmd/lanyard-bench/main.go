// Command lanyard-bench measures a Lanyard agent: one-shot FetchX509SVID
// latency and throughput against a floor (a bare gRPC server answering with
// the same bytes), rotation fan-out to open streams, RSS, and start-up.
// "suite" runs everything against a signer and agent it starts itself
// (make bench); "oneshot" and "streams" measure an agent already running,
// so operators can load-test their own hosts.
//
// Size: past the ~800-line guide, as each measurement (one-shot, fan-out,
// floods, start-up, the floor) is its own file of one program.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/internal/cli"
)

const usage = `usage: lanyard-bench <command> [flags]

commands:
  oneshot --socket PATH [--calls N] [--clients 32,64] [--duration 3s] [--max-calls N] [--no-floor]
        one-shot FetchX509SVID against a running agent, side by side with a floor
  streams --socket PATH [--streams 1000,10000] [--rotations 3] [--pid AGENT_PID]
        open streams (one per connection), report the agent's RSS and the spread
        of the next rotations over them (needs an entry with a short x509_ttl)
  suite --agent-bin F --signer-bin F --tpm-socket S --ek-ca F --dir D [flags]
        start a signer and an agent and print the whole table (make bench)
  floor --socket PATH
        serve the marshaled X509SVIDResponse read from stdin (used by the others)
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	args := os.Args[2:]
	var (
		rows []row
		err  error
	)
	switch os.Args[1] {
	case "oneshot":
		rows, err = cmdOneShot(args)
	case "streams":
		rows, err = cmdStreams(args)
	case "suite":
		rows, err = cmdSuite(args)
	case "floor":
		fs := flag.NewFlagSet("floor", flag.ExitOnError)
		socket := fs.String("socket", "", "Unix socket to serve on")
		fs.Parse(args)
		if *socket == "" {
			cli.Fatalf(2, "floor: --socket is required")
		}
		ctx, stop := cli.SignalContext()
		defer stop()
		if err := serveFloor(ctx, *socket, os.Stdin, os.Stdout); err != nil {
			cli.Fatalf(1, "lanyard-bench: %v", err)
		}
		return
	case "flood": // the attacker side of the flood figure (flood.go)
		if err := cmdFlood(args, os.Stdin, os.Stdout); err != nil {
			cli.Fatalf(1, "lanyard-bench: %v", err)
		}
		return
	case "help", "-h", "--help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if len(rows) > 0 {
		printTable(os.Stdout, rows)
		if os.Args[1] == "suite" {
			printGoals(os.Stdout, rows)
		}
	}
	if err != nil {
		cli.Fatalf(1, "lanyard-bench: %v", err)
	}
}

func cmdOneShot(args []string) ([]row, error) {
	fs := flag.NewFlagSet("oneshot", flag.ExitOnError)
	socket := fs.String("socket", "", "the agent's Workload API socket")
	calls := fs.Int("calls", 2000, "sequential one-shot calls")
	clients := fs.String("clients", "32,64", "concurrent client counts, comma-separated")
	duration := fs.Duration("duration", 3*time.Second, "how long each concurrent run lasts at most")
	maxCalls := fs.Int("max-calls", 50000, "calls per concurrent run at most")
	noFloor := fs.Bool("no-floor", false, "measure the agent only")
	fs.Parse(args)
	if *socket == "" {
		return nil, fmt.Errorf("oneshot: --socket is required")
	}
	cs, err := ints(*clients)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	w := &suiteRun{cfg: suiteConfig{Dir: dir, Calls: *calls, Clients: cs, Duration: *duration, MaxCalls: *maxCalls}}
	if *noFloor {
		ds, err := sequential(context.Background(), *socket, *calls)
		return []row{durationRow("one-shot FetchX509SVID, sequential", ds, "")}, err
	}
	return w.oneShotsOn(*socket)
}

func cmdStreams(args []string) ([]row, error) {
	fs := flag.NewFlagSet("streams", flag.ExitOnError)
	socket := fs.String("socket", "", "the agent's Workload API socket")
	streams := fs.String("streams", "1000,10000", "open-stream levels, comma-separated")
	rotations := fs.Int("rotations", 3, "rotations to wait for at each level")
	pid := fs.Int("pid", 0, "the agent's PID, to report its RSS (0: no RSS)")
	fs.Parse(args)
	if *socket == "" {
		return nil, fmt.Errorf("streams: --socket is required")
	}
	levels, err := ints(*streams)
	if err != nil {
		return nil, err
	}
	w := &suiteRun{cfg: suiteConfig{Streams: levels, Rotations: *rotations}}
	return w.fanoutOn(*socket, *pid, 0)
}

func cmdSuite(args []string) ([]row, error) {
	fs := flag.NewFlagSet("suite", flag.ExitOnError)
	var c suiteConfig
	fs.StringVar(&c.AgentBin, "agent-bin", "bin/lanyard-agent", "lanyard-agent binary")
	fs.StringVar(&c.SignerBin, "signer-bin", "bin/lanyard-signer", "lanyard-signer binary")
	fs.StringVar(&c.TPMSocket, "tpm-socket", "", "swtpm socket the agent uses")
	fs.StringVar(&c.EKCA, "ek-ca", "", "PEM CA chain the TPM's EK certificate chains to")
	fs.StringVar(&c.Dir, "dir", "", "work directory (configs, sockets, logs)")
	fs.IntVar(&c.Calls, "calls", 2000, "sequential one-shot calls")
	clients := fs.String("clients", "32,64", "concurrent client counts")
	fs.DurationVar(&c.Duration, "duration", 3*time.Second, "length of each concurrent run at most")
	fs.IntVar(&c.MaxCalls, "max-calls", 50000, "calls per concurrent run at most")
	streams := fs.String("streams", "1000,10000", "open-stream levels")
	fs.IntVar(&c.Rotations, "rotations", 3, "rotations measured per level")
	fs.IntVar(&c.Starts, "starts", 3, "agent starts measured")
	fs.IntVar(&c.Entries, "entries", 1000, "workload entries in the many-entries phase")
	fs.StringVar(&c.AgentLogLevel, "agent-log-level", "", "the agent's log_level (default: the agent's own, info)")
	fs.IntVar(&c.AttestFlood, "attest-flood", 20000, "Attest streams sending nothing, opened on one connection to a lone signer (0: skip)")
	gobench := fs.String("gobench", "", "files of `go test -bench` output to add to the table, comma-separated")
	fs.Parse(args)
	if c.TPMSocket == "" || c.EKCA == "" || c.Dir == "" {
		return nil, fmt.Errorf("suite: --tpm-socket, --ek-ca and --dir are required")
	}
	var err error
	if c.Clients, err = ints(*clients); err != nil {
		return nil, err
	}
	if c.Streams, err = ints(*streams); err != nil {
		return nil, err
	}
	if *gobench != "" {
		c.GoBench = strings.Split(*gobench, ",")
	}
	c.Starts = max(c.Starts, 1)
	return suite(c)
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q: want positive integers, comma-separated", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// freePort picks a free loopback TCP port for the signer.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

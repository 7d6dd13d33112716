package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// defaultSocket is where the agent listens unless configured otherwise.
const defaultSocket = "/run/lanyard/workload.sock"

// socketAddr picks the Workload API address: --socket, else
// SPIFFE_ENDPOINT_SOCKET (as every SPIFFE client does), else the default.
// Both accept a bare path as well as a unix:// address: the SPIFFE spec
// wants the scheme in the variable, but a path is what people type, and
// go-spiffe's own error for it ("workload endpoint socket URI must have
// a tcp:// or unix:// scheme") names no fix.
func socketAddr(flagValue string) string {
	v := flagValue
	if v == "" {
		v = os.Getenv("SPIFFE_ENDPOINT_SOCKET")
	}
	switch {
	case v == "":
		return "unix://" + defaultSocket
	case strings.Contains(v, "://"):
		return v
	}
	return "unix://" + v
}

// fetchX509 fetches this process's X.509-SVIDs with go-spiffe's client and
// prints what an operator needs: IDs, serials, expiry. Never the key.
func fetchX509(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fetch x509", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "Workload API socket (default $SPIFFE_ENDPOINT_SOCKET or "+defaultSocket+")")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return cli.FlagExit(err, 2)
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "fetch x509: unexpected argument %q\n", pos[0])
		return 2
	}
	addr := socketAddr(*socket)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	x, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		fmt.Fprintf(stderr, "fetch x509 from %s: %v\n", addr, err)
		return 1
	}
	now := time.Now()
	for _, s := range x.SVIDs {
		leaf := s.Certificates[0]
		fmt.Fprintf(stdout, "SPIFFE ID:  %s\n", s.ID)
		if s.Hint != "" {
			fmt.Fprintf(stdout, "  hint:       %s\n", s.Hint)
		}
		fmt.Fprintf(stdout, "  serial:     %s\n", leaf.SerialNumber.Text(16))
		fmt.Fprintf(stdout, "  not before: %s\n", leaf.NotBefore.UTC().Format(time.RFC3339))
		fmt.Fprintf(stdout, "  not after:  %s (in %s)\n", leaf.NotAfter.UTC().Format(time.RFC3339), leaf.NotAfter.Sub(now).Round(time.Second))
		if len(leaf.DNSNames) > 0 {
			fmt.Fprintf(stdout, "  DNS names:  %s\n", strings.Join(leaf.DNSNames, ", "))
		}
		fmt.Fprintf(stdout, "  chain:      %d certificate(s)\n", len(s.Certificates))
	}
	for _, b := range x.Bundles.Bundles() {
		fmt.Fprintf(stdout, "trust bundle %s: %d X.509 authorities\n", b.TrustDomain(), len(b.X509Authorities()))
	}
	return 0
}

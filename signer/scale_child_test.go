//go:build cgo

package signer_test

// The signer of BenchmarkSignerScale runs in a child process (this test
// binary, started again), so its RSS and CPU time are its own and not
// mixed with the simulated agents'. The child serves on loopback, prints
// its address, and reloads its policy file on each "reload" line of its
// stdin, as a file watcher would: read, parse, SetPolicy; revokes a node
// on each "revoke EK-SHA256" line, as `node revoke` does; and, as a
// replica of BenchmarkSignerTier, applies the policy file of each
// "apply PATH" line to the tier, as `lanyard-signer policy apply` does.

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/signer"
	"github.com/lanyard-dev/lanyard/signer/policy"
)

// scaleChildEnv names the signer config the child serves; the child runs
// only when it is set.
const scaleChildEnv = "LANYARD_SCALE_SIGNER_CONFIG"

// scaleChildAddrEnv, when set, is the host:port the child listens on.
const scaleChildAddrEnv = "LANYARD_SCALE_SIGNER_ADDR"

func TestScaleSignerChild(t *testing.T) {
	path := os.Getenv(scaleChildEnv)
	if path == "" {
		t.Skip("the signer process of BenchmarkSignerScale: runs only when the benchmark starts it (" + scaleChildEnv + " unset)")
	}
	cfg, err := signer.LoadConfig(path)
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	s, err := signer.New(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("signer.New: %v", err)
	}
	// A restarted child listens where the killed one did.
	lis, err := net.Listen("tcp", cmp.Or(os.Getenv(scaleChildAddrEnv), "127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	// Serve writes the bundle before it serves, and a replica of a tier
	// serves only once it joined (a joining one after ca_publish_lead):
	// the address is announced once agents are served.
	select {
	case <-s.Ready():
	case err := <-done:
		t.Fatalf("Serve ended before serving: %v", err)
	case <-time.After(scaleTimeout):
		t.Fatalf("not serving after %v", scaleTimeout)
	}
	// The wall clock of readiness goes with the address: the benchmark
	// times the agents' re-sync from it.
	fmt.Printf("addr %s %d\n", lis.Addr(), time.Now().UnixNano())

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if path, ok := strings.CutPrefix(in.Text(), "apply "); ok {
			fmt.Println(childApply(ctx, s, path))
			continue
		}
		if jti, ok := strings.CutPrefix(in.Text(), "tokenrevoke "); ok {
			// What the admin socket's POST /v1/tokens/revoke calls.
			if _, err := s.RevokeToken(signer.TokenRevokeRequest{JTI: jti, Reason: "benchmark"}, 0); err != nil {
				fmt.Printf("error %v\n", err)
				continue
			}
			fmt.Println("ok")
			continue
		}
		if ek, ok := strings.CutPrefix(in.Text(), "revoke "); ok {
			// What the admin socket's POST /v1/nodes/revoke calls.
			if _, err := s.Revoke(ek, "benchmark", 0); err != nil {
				fmt.Printf("error %v\n", err)
				continue
			}
			fmt.Println("ok")
			continue
		}
		if in.Text() != "reload" {
			continue
		}
		p, err := policy.Load(cfg.PolicyPath, cfg.TrustDomain)
		if err != nil {
			fmt.Printf("error %v\n", err)
			continue
		}
		s.SetPolicy(p)
		fmt.Println("ok")
	}
	// Stdin closed: the benchmark is done.
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
}

// childApply is what the admin socket's policy apply calls: the file's
// content becomes etcd's next policy revision. It answers "ok" once the
// revision is in force on this replica.
func childApply(ctx context.Context, s *signer.Signer, path string) string {
	src, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("error %v", err)
	}
	ctx, cancel := context.WithTimeout(ctx, scaleTimeout)
	defer cancel()
	st, err := s.ApplyPolicy(ctx, signer.PolicyApply{Filename: path, Source: string(src)}, 0)
	switch {
	case err != nil:
		return fmt.Sprintf("error %v", err)
	case st.Error != "":
		return "error " + st.Error
	}
	return "ok"
}

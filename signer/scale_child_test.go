//go:build cgo

package signer_test

// The signer of BenchmarkSignerScale runs in a child process (this test
// binary, started again), so its RSS and CPU time are its own and not
// mixed with the simulated agents'. The child serves on loopback, prints
// its address, and reloads its policy file on each "reload" line of its
// stdin, as a file watcher would: read, parse, SetPolicy.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/signer"
	"github.com/lanyard-dev/lanyard/signer/policy"
)

// scaleChildEnv names the signer config the child serves; the child runs
// only when it is set.
const scaleChildEnv = "LANYARD_SCALE_SIGNER_CONFIG"

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
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	// Serve writes the bundle first: the address is announced once the
	// bundle an agent needs is there.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(cfg.BundlePath); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no bundle at %s after 30s", cfg.BundlePath)
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Printf("addr %s\n", lis.Addr())

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
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

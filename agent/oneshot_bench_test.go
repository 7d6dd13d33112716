package agent

// What one one-shot FetchX509SVID costs the agent: the agent's cache, every
// workload attestor, the agent's default limits and an Info logger writing
// to a file (as the agent writes its audit lines to stderr), served on a
// real Unix socket. Each op is what a short-lived workload does: dial,
// send the header and the request, read the first response, hang up.
//
// Profile it with -cpuprofile, -memprofile, -blockprofile, -mutexprofile
// (BENCHMARKS.md, "Issue 19"). The client runs in this process too, so a
// profile shows both sides: read the agent's share under workloadapi,
// attestor/workload, agent and grpc's server transport.

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
	"github.com/lanyard-dev/lanyard/workloadapi"
)

// BenchmarkOneShotFetch runs one-shot calls one at a time (clients=1) and
// from 32 goroutines at once (clients=32, b.SetParallelism).
func BenchmarkOneShotFetch(b *testing.B) {
	for _, clients := range []int{1, 32} {
		b.Run("clients="+map[int]string{1: "1", 32: "32"}[clients], func(b *testing.B) {
			path := startOneShotServer(b)
			if clients == 1 {
				for b.Loop() {
					oneShotCall(b, path)
				}
				return
			}
			// RunParallel starts GOMAXPROCS*p goroutines.
			b.SetParallelism(max(1, 32/runtime.GOMAXPROCS(0)))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					oneShotCall(b, path)
				}
			})
		})
	}
}

// startOneShotServer serves the fan-out entry through every workload
// attestor and the agent's default limits, logging at Info to a file.
func startOneShotServer(b *testing.B) string {
	b.Helper()
	c, dir := fanoutFixture(b, fanoutCA(b))
	logFile, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		b.Fatalf("log file: %v", err)
	}
	b.Cleanup(func() { _ = logFile.Close() })
	log := hclog.New(&hclog.LoggerOptions{Name: "workloadapi", Level: hclog.Info, Output: logFile})
	att, err := attestor.New(attestor.Config{})
	if err != nil {
		b.Fatalf("attestor: %v", err)
	}
	limits, err := LimitsConfig{}.workloadLimits()
	if err != nil {
		b.Fatalf("limits: %v", err)
	}
	path := filepath.Join(dir, "w.sock")
	runServer(b, workloadapi.Config{SocketPath: path, Attestor: att, Source: c, Log: log, Limits: limits})
	return path
}

// oneShotCall is lanyard-bench's one-shot call: a new connection, the
// first response, hang up.
func oneShotCall(b *testing.B, path string) {
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 10*time.Second)
	defer cancel()
	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Error(err)
		return
	}
	defer cc.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		var resp *workload.X509SVIDResponse
		if resp, err = stream.Recv(); err == nil && len(resp.GetSvids()) == 0 {
			b.Error("response without SVIDs")
		}
	}
	if err != nil {
		b.Error(err)
	}
}

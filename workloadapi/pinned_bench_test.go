package workloadapi

import (
	"context"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	wlclient "github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/lanyard-dev/lanyard/attestor/workload"
)

// BenchmarkAcceptWindow measures the window the kernel leaves open: it
// records only pid, uid and gid at connect(2), so a process that execs
// between its connect and the moment the agent pins it (in Accept) is
// taken for the program it became. Each op connects a raw socket and
// waits for the server's first bytes (its HTTP/2 settings, written right
// after Accept returned), an upper bound of that window. Sub-benchmarks
// run it on an idle server and next to 64 clients making one-shot
// FetchX509SVID calls (each a new connection) without pause. It reports
// the window's p50, p99 and max in microseconds (README, "Security
// model").
func BenchmarkAcceptWindow(b *testing.B) {
	for _, load := range []int{0, 64} {
		b.Run(map[int]string{0: "idle", 64: "64 one-shot clients"}[load], func(b *testing.B) {
			benchAcceptWindow(b, load)
		})
	}
}

func benchAcceptWindow(b *testing.B, load int) {
	ca := newTestCA(b)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(b, "/web"))
	att, err := workload.New(workload.Config{})
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(socketDir(b), "w.sock")
	s := New(Config{SocketPath: path, Attestor: att, Source: src})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("Run: %v", err)
		}
	}()
	<-s.Ready()

	// The load: bounded in time (until the benchmark ends, at most a
	// minute) and in count.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range load {
		wg.Go(func() {
			deadline := time.Now().Add(time.Minute)
			for i := 0; i < 100_000 && time.Now().Before(deadline); i++ {
				select {
				case <-stop:
					return
				default:
				}
				cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
				_, _ = wlclient.FetchX509SVID(cctx, wlclient.WithAddr("unix://"+path))
				ccancel()
			}
		})
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()

	windows := make([]time.Duration, 0, b.N)
	buf := make([]byte, 1)
	for b.Loop() {
		c, err := net.Dial("unix", path)
		if err != nil {
			b.Fatal(err)
		}
		connected := time.Now()
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
		windows = append(windows, time.Since(connected))
		_ = c.Close()
	}
	if len(windows) == 0 {
		return
	}
	slices.Sort(windows)
	at := func(q float64) float64 {
		return float64(windows[int(q*float64(len(windows)-1))].Microseconds())
	}
	b.ReportMetric(at(0.5), "p50-µs")
	b.ReportMetric(at(0.99), "p99-µs")
	b.ReportMetric(at(1), "max-µs")
}

package workloadapi

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/lanyard-dev/lanyard/internal/testwait"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
)

// helperStreams tells the streams helper how many streams to open.
const helperStreams = "LANYARD_TEST_STREAMS"

// runStreamsHelper opens helperStreams connections to socket, each with a
// FetchX509SVID stream, reads each stream's first response, says "ready",
// and holds them all until stdin closes; a stream that ends before that
// says "end <i> <code>". Idle streams from another process, so that what
// the server holds for them can be counted in the server's process alone.
func runStreamsHelper(socket string) int {
	n, err := strconv.Atoi(os.Getenv(helperStreams))
	if err != nil || n <= 0 {
		return fail("streams count", fmt.Errorf("%s=%q", helperStreams, os.Getenv(helperStreams)))
	}
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), securityHeader, "true"))
	defer cancel()
	ends := make(chan string, n)
	for i := range n {
		cc, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return fail("client", err)
		}
		defer cc.Close()
		stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err == nil {
			_, err = stream.Recv()
		}
		if err != nil {
			return fail("stream "+strconv.Itoa(i), err)
		}
		go func() {
			for {
				if _, err := stream.Recv(); err != nil {
					ends <- fmt.Sprintf("end %d %s", i, status.Code(err))
					return
				}
			}
		}()
	}
	fmt.Println("ready")
	closed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(closed)
	}()
	for {
		select {
		case l := <-ends:
			fmt.Println(l)
		case <-closed:
			return 0
		}
	}
}

// streamsHelper is a running streams helper.
type streamsHelper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
}

// startStreams starts a helper holding n idle streams on socket and waits
// until every stream has had its first response. The helper ends with the
// test, or earlier through stop.
func startStreams(tb testing.TB, socket string, n int) *streamsHelper {
	tb.Helper()
	self, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	cmd := helperCmd(self, "streams", socket)
	cmd.Env = append(cmd.Env, helperStreams+"="+strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	stdin, stdout := startPiped(tb, cmd, "streams helper")
	h := &streamsHelper{cmd: cmd, stdin: stdin, lines: make(chan string, n+1)}
	go func() {
		defer close(h.lines)
		in := bufio.NewScanner(stdout)
		for in.Scan() {
			h.lines <- in.Text()
		}
	}()
	tb.Cleanup(h.stop)
	select {
	case l := <-h.lines:
		if l != "ready" {
			tb.Fatalf("streams helper said %q, want ready", l)
		}
	case <-time.After(60 * time.Second):
		tb.Fatalf("streams helper not ready after 60s")
	}
	return h
}

// stop closes the helper's streams and waits for it; it may be called
// twice.
func (h *streamsHelper) stop() {
	_ = h.stdin.Close()
	_ = h.cmd.Wait()
}

// startStreamServer serves an SVID to every caller of this uid, with
// every workload attestor, until the test ends. It logs nothing, so that
// no log buffer grows with the streams it serves.
func startStreamServer(tb testing.TB) *running {
	tb.Helper()
	ca := newTestCA(tb)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(tb, "/web"))
	att, err := attestor.New(attestor.Config{})
	if err != nil {
		tb.Fatal(err)
	}
	r := &running{path: filepath.Join(socketDir(tb), "w.sock"), done: make(chan error, 1)}
	r.server = New(Config{SocketPath: r.path, Attestor: att, Source: src})
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- r.server.Run(ctx) }()
	tb.Cleanup(func() {
		if err := r.stop(); err != nil {
			tb.Errorf("Run: %v", err)
		}
	})
	select {
	case <-r.server.Ready():
	case err := <-r.done:
		tb.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		tb.Fatal("server not ready after 10s")
	}
	return r
}

// serverMemory is what the server's process holds in heap spans and
// goroutine stacks, after a collection.
func serverMemory() (bytes uint64, goroutines int) {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse, runtime.NumGoroutine()
}

// BenchmarkIdleStreams measures what the server holds per idle
// FetchX509SVID stream (one per connection, as go-spiffe opens them):
// heap in use plus goroutine stacks, and goroutines, with 1,000 streams
// open from another process against none. Each op opens and closes the
// 1,000 streams; run it with -benchtime 1x or a few x.
func BenchmarkIdleStreams(b *testing.B) {
	const n = 1000
	path := startStreamServer(b).path
	var bytes, goroutines float64
	for b.Loop() {
		memBefore, gBefore := serverMemory()
		h := startStreams(b, path, n)
		memAfter, gAfter := serverMemory()
		h.stop()
		bytes += float64(int64(memAfter)-int64(memBefore)) / n
		goroutines += float64(gAfter-gBefore) / n
		// The next round starts from the same idle server.
		testwait.For(b, 30*time.Second, "the streams' goroutines to end", func() bool {
			return runtime.NumGoroutine() <= gBefore
		})
	}
	b.ReportMetric(bytes/float64(b.N), "B/stream")
	b.ReportMetric(goroutines/float64(b.N), "goroutines/stream")
}

// TestIdleStreamGoroutines: an idle stream costs the server four
// goroutines (gRPC's reader, writer and keepalive for its connection, and
// the handler), not five: its caller's exit is watched by the Server's one
// exitWatcher goroutine, not by one goroutine per connection.
func TestIdleStreamGoroutines(t *testing.T) {
	const n = 200
	path := startStreamServer(t).path
	_, before := serverMemory()
	startStreams(t, path, n)
	_, after := serverMemory()
	added := after - before
	t.Logf("%d streams added %d goroutines (%.2f each)", n, added, float64(added)/n)
	// A few goroutines of the server's own may come and go meanwhile;
	// one more per stream cannot hide in this slack.
	if limit := 4*n + n/10; added > limit {
		t.Errorf("%d streams added %d goroutines, want at most %d", n, added, limit)
	}
}

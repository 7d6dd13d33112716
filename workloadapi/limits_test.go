package workloadapi

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testwait"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// refusals is a LimitObserver (and Observer) that counts refusals.
type refusals struct {
	*recorder
	mu sync.Mutex
	n  map[string]int
}

func newRefusals() *refusals { return &refusals{recorder: newRecorder(), n: map[string]int{}} }

func (r *refusals) Refused(reason string) { r.mu.Lock(); r.n[reason]++; r.mu.Unlock() }

func (r *refusals) count(reason string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[reason]
}

// limitedServer runs a server with lim whose socket every user can reach;
// uid 65534 ("nobody") is entitled to spiffe://example.org/nobody.
func limitedServer(t *testing.T, lim Limits) (*running, *refusals) {
	t.Helper()
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set("unix:uid:65534", ca.svidResponse(t, "/nobody"))
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	dir := socketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	obs := newRefusals()
	lim.WarnInterval = time.Hour // one line per uid for the whole test
	srv := startServerWith(t, Config{SocketPath: filepath.Join(dir, "w.sock"), Attestor: unixOnly, Source: src, Observer: obs, Limits: lim})
	return srv, obs
}

// fetchAsNobody runs a go-spiffe client as uid 65534 and returns what it
// printed: the SPIFFE IDs it was served, or "error <code>".
func fetchAsNobody(t *testing.T, socket string) string {
	t.Helper()
	exe, _ := helperCopies(t)
	cmd := helperCmd(exe, "fetch", socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	return strings.TrimSpace(string(out))
}

func hasExhaustion(ex []Exhaustion, limit string, uid int64, now bool) bool {
	return slices.ContainsFunc(ex, func(e Exhaustion) bool { return e.Limit == limit && e.UID == uid && (!now || e.Now) })
}

// TestStreamFloodRefused reproduces one uid opening streams without end
// (50,000 bundle streams took 1.6 GB): past a cap each call is refused
// with ResourceExhausted and counted, and another uid is still served.
func TestStreamFloodRefused(t *testing.T) {
	needRoot(t)
	tests := []struct {
		name       string
		lim        Limits
		conns, per int // connections, streams on each
		wantOK     int
		reason     string
	}{
		{name: "per connection", lim: Limits{MaxStreamsPerConn: 4}, conns: 1, per: 40, wantOK: 4, reason: LimitStreamsPerConn},
		{name: "per uid", lim: Limits{MaxStreamsPerUID: 6, MaxStreamsPerConn: 128}, conns: 4, per: 5, wantOK: 6, reason: LimitStreamsPerUID},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, obs := limitedServer(t, tc.lim)
			ctx, cancel := context.WithTimeout(withHeader(context.Background()), 30*time.Second)
			defer cancel()
			ok, exhausted := 0, 0
			for range tc.conns {
				c := rawClient(t, srv.path)
				for range tc.per {
					// Bundle streams count like the others.
					s, err := c.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
					if err == nil {
						_, err = s.Recv()
					}
					switch status.Code(err) {
					case codes.OK:
						ok++
					case codes.ResourceExhausted:
						exhausted++
					default:
						t.Fatalf("stream: %v", err)
					}
				}
			}
			if total := tc.conns * tc.per; ok != tc.wantOK || exhausted != total-tc.wantOK {
				t.Errorf("streams served %d, refused %d; want %d and %d", ok, exhausted, tc.wantOK, total-tc.wantOK)
			}
			if _, open, _ := obs.snapshot(); open["FetchX509Bundles"] != tc.wantOK {
				t.Errorf("open bundle streams = %d, want %d", open["FetchX509Bundles"], tc.wantOK)
			}
			if got := obs.count(tc.reason); got != tc.conns*tc.per-tc.wantOK {
				t.Errorf("refusals[%s] = %d, want %d", tc.reason, got, tc.conns*tc.per-tc.wantOK)
			}
			if got := fetchAsNobody(t, srv.path); got != "spiffe://example.org/nobody" {
				t.Errorf("uid 65534 got %q, want its SVID", got)
			}
			if ex := srv.server.Exhaustion(time.Now()); !hasExhaustion(ex, tc.reason, int64(os.Getuid()), false) {
				t.Errorf("Exhaustion = %+v, want %s for uid %d", ex, tc.reason, os.Getuid())
			}
			if n := strings.Count(srv.logs.String(), "refused call: limit reached"); n != 1 {
				t.Errorf("%d refusal warnings logged, want 1 (rate-limited per uid)", n)
			}
		})
	}
}

// rawConns opens n connections that say nothing, and returns them with how
// many the server closed at once (read EOF) rather than greeting them.
func rawConns(t *testing.T, path string, n int) (conns []net.Conn, closed int) {
	t.Helper()
	for range n {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		conns = append(conns, c)
	}
	for _, c := range conns {
		// An admitted connection gets gRPC's SETTINGS frame; a refused one
		// is closed.
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			closed++
		} else if err != nil {
			t.Fatalf("read: %v", err)
		}
	}
	return conns, closed
}

// waitClosed waits until the server has closed c.
func waitClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return
		}
		if err != nil {
			t.Fatalf("connection not closed by the server: %v", err)
		}
	}
}

// TestConnectionFloodRefused reproduces one user holding connections
// (11,000 idle ones took every descriptor): past a cap connections are
// closed at accept, idle ones at their deadline, and another uid is still
// served unless the total cap itself is reached, which status reports.
func TestConnectionFloodRefused(t *testing.T) {
	needRoot(t)
	uid := int64(os.Getuid())
	t.Run("per uid", func(t *testing.T) {
		srv, obs := limitedServer(t, Limits{MaxConnsPerUID: 5})
		_, closed := rawConns(t, srv.path, 25)
		if closed != 20 {
			t.Errorf("server closed %d of 25 connections at once, want 20", closed)
		}
		if got := obs.count(LimitConnsPerUID); got != 20 {
			t.Errorf("refusals[%s] = %d, want 20", LimitConnsPerUID, got)
		}
		if got := fetchAsNobody(t, srv.path); got != "spiffe://example.org/nobody" {
			t.Errorf("uid 65534 got %q, want its SVID", got)
		}
		if ex := srv.server.Exhaustion(time.Now()); !hasExhaustion(ex, LimitConnsPerUID, uid, true) {
			t.Errorf("Exhaustion = %+v, want uid %d at %s now", ex, uid, LimitConnsPerUID)
		}
		if n := strings.Count(srv.logs.String(), "refused connection: limit reached"); n != 1 {
			t.Errorf("%d refusal warnings logged, want 1 (rate-limited per uid)", n)
		}
	})
	t.Run("idle deadline", func(t *testing.T) {
		srv, obs := limitedServer(t, Limits{MaxConnsPerUID: 5, IdleTimeout: 50 * time.Millisecond})
		conns, closed := rawConns(t, srv.path, 5)
		if closed != 0 {
			t.Fatalf("%d connections refused at once, want 0", closed)
		}
		for _, c := range conns {
			waitClosed(t, c)
		}
		testwait.For(t, 10*time.Second, "idle connections counted", func() bool { return obs.count(LimitIdle) == 5 })
		// Their places are free again: this uid is served.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := newClient(t, srv.path).FetchX509Context(ctx); err != nil {
			t.Errorf("FetchX509Context after the idle connections closed: %v", err)
		}
	})
	t.Run("total", func(t *testing.T) {
		srv, obs := limitedServer(t, Limits{MaxConns: 3})
		conns, closed := rawConns(t, srv.path, 3)
		if closed != 0 {
			t.Fatalf("%d connections refused at once, want 0", closed)
		}
		if got := fetchAsNobody(t, srv.path); !strings.HasPrefix(got, "error") {
			t.Errorf("uid 65534 got %q past the total cap, want an error", got)
		}
		if obs.count(LimitConns) == 0 {
			t.Errorf("no %s refusal counted", LimitConns)
		}
		if ex := srv.server.Exhaustion(time.Now()); !hasExhaustion(ex, LimitConns, -1, true) {
			t.Errorf("Exhaustion = %+v, want %s now", ex, LimitConns)
		}
		for _, c := range conns {
			_ = c.Close()
		}
		testwait.For(t, 10*time.Second, "connections released", func() bool {
			return !hasExhaustion(srv.server.Exhaustion(time.Now()), LimitConns, -1, true)
		})
		if got := fetchAsNobody(t, srv.path); got != "spiffe://example.org/nobody" {
			t.Errorf("uid 65534 got %q once the connections closed, want its SVID", got)
		}
	})
}

// TestWarnLimiter checks that a uid's warnings become one line per
// interval with their count, and that uids do not share a budget.
func TestWarnLimiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf logBuffer
		w := newWarnLimiter(hclog.New(&hclog.LoggerOptions{Output: &buf, JSONFormat: true}), 10*time.Second)
		for range 1000 {
			w.Warn(65534, "caller exited during attestation", "uid", 65534)
		}
		w.Warn(1000, "caller exited during attestation", "uid", 1000)
		if n := strings.Count(buf.String(), "\n"); n != 2 {
			t.Fatalf("%d lines logged at once, want 2 (one per uid):\n%s", n, buf.String())
		}
		time.Sleep(10 * time.Second)
		synctest.Wait()
		logs := buf.String()
		if n := strings.Count(logs, "\n"); n != 3 || !strings.Contains(logs, `"count":999`) {
			t.Fatalf("after one interval, want a third line counting 999:\n%s", logs)
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if n := strings.Count(buf.String(), "\n"); n != 3 {
			t.Fatalf("quiet intervals logged more lines:\n%s", buf.String())
		}
		w.Warn(65534, "caller exited during attestation", "uid", 65534)
		if n := strings.Count(buf.String(), "\n"); n != 4 {
			t.Fatalf("a warning after a quiet interval was not logged at once:\n%s", buf.String())
		}
		time.Sleep(10 * time.Second) // let its interval end inside the bubble
	})
}

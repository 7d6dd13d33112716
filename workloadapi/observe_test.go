package workloadapi

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// recorder is an Observer that remembers what it was told.
type recorder struct {
	mu       sync.Mutex
	calls    map[string]int // "method code"
	open     map[string]int
	attested map[bool]int
}

func newRecorder() *recorder {
	return &recorder{calls: map[string]int{}, open: map[string]int{}, attested: map[bool]int{}}
}

func (r *recorder) CallDone(m string, c codes.Code) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls[m+" "+c.String()]++
}

func (r *recorder) StreamOpened(m string) { r.mu.Lock(); r.open[m]++; r.mu.Unlock() }
func (r *recorder) StreamClosed(m string) { r.mu.Lock(); r.open[m]--; r.mu.Unlock() }

func (r *recorder) CallerAttested(_ time.Duration, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.attested[ok]++
}

func (r *recorder) snapshot() (calls, open map[string]int, attested map[bool]int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	clone := func(m map[string]int) map[string]int {
		out := map[string]int{}
		for k, v := range m {
			if v != 0 {
				out[k] = v
			}
		}
		return out
	}
	att := map[bool]int{}
	for k, v := range r.attested {
		att[k] = v
	}
	return clone(r.calls), clone(r.open), att
}

// waitOpen polls until the recorder holds want open streams of FetchX509SVID.
func (r *recorder) waitOpen(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, open, _ := r.snapshot()
		if open["FetchX509SVID"] == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("open FetchX509SVID streams = %d after 10s, want %d", open["FetchX509SVID"], want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestObserver(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	rec := newRecorder()
	srv := startServerWith(t, Config{SocketPath: filepath.Join(socketDir(t), "w.sock"), Attestor: unixOnly, Source: src, Observer: rec})
	client := newClient(t, srv.path)

	// A one-shot fetch: the stream opens, and ends when the client hangs up.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := client.FetchX509SVID(ctx); err != nil {
		t.Fatal(err)
	}
	rec.waitOpen(t, 0)

	// Two watchers stay open until canceled.
	wctx, wcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = client.WatchX509Context(wctx, watcher{ids: make(chan string, 10)})
		}()
	}
	rec.waitOpen(t, 2)
	wcancel()
	wg.Wait()
	rec.waitOpen(t, 0)

	// A call without the security header is counted with its refusal.
	conn, err := grpc.NewClient("unix://"+srv.path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("call without header: %v, want InvalidArgument", err)
	}

	deadline := time.Now().Add(10 * time.Second)
	for {
		calls, _, att := rec.snapshot()
		if calls["FetchX509SVID InvalidArgument"] == 1 && calls["FetchX509SVID Canceled"] == 3 && att[true] == 3 && att[false] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: calls %v, attestations %v; want 3 Canceled (streams end when the client hangs up), 1 InvalidArgument and 3 successful attestations", calls, att)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAuditLines checks the fixed keys of the audit lines for a served and
// a refused caller (README "Audit log"), and that no line carries a key.
func TestAuditLines(t *testing.T) {
	ca := newTestCA(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		selector string
		message  string
		wantKeys []string
	}{
		{"served", uidSelector(), "served X.509-SVIDs", []string{"pid", "uid", "exe", "selectors", "spiffe_ids", "serials"}},
		{"refused", "unix:uid:4242424", "no identity issued", []string{"pid", "uid", "exe", "selectors", "reason"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource(ca.bundlesResponse())
			resp := ca.svidResponse(t, "/web")
			src.set(tc.selector, resp)
			srv := startServer(t, unixOnly, src)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, _ = newClient(t, srv.path).FetchX509SVID(ctx)
			logs := srv.logs.waitFor(t, `"@message":"`+tc.message+`"`)

			var line map[string]any
			for l := range strings.Lines(logs) {
				var m map[string]any
				if err := json.Unmarshal([]byte(l), &m); err != nil {
					t.Fatalf("log line is not JSON: %q", l)
				}
				if m["@message"] == tc.message {
					line = m
				}
			}
			for _, k := range tc.wantKeys {
				if _, ok := line[k]; !ok {
					t.Errorf("audit line lacks %q: %v", k, line)
				}
			}
			if got := line["exe"]; got != exe {
				t.Errorf("exe = %v, want %s", got, exe)
			}
			if got := fmt.Sprint(line["pid"]); got != fmt.Sprint(os.Getpid()) {
				t.Errorf("pid = %s, want %d", got, os.Getpid())
			}
			if tc.name == "served" {
				_, serials := auditFacts(resp)
				if diff := cmp.Diff([]any{serials[0]}, line["serials"]); diff != "" || serials[0] == "?" {
					t.Errorf("serials (-want +got):\n%s", diff)
				}
			}
			for _, bad := range []string{"PRIVATE KEY", "CERTIFICATE REQUEST"} {
				if strings.Contains(logs, bad) {
					t.Errorf("logs contain %q:\n%s", bad, logs)
				}
			}
		})
	}
}

func TestLeafSerial(t *testing.T) {
	ca := newTestCA(t)
	leaf := ca.svidResponse(t, "/web").GetSvids()[0].GetX509Svid()
	cert, err := x509.ParseCertificate(leaf)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		chain []byte
		want  string
	}{
		{"leaf", leaf, cert.SerialNumber.Text(16)},
		{"chain: leaf first", append(slices.Clone(leaf), ca.Cert.Raw...), cert.SerialNumber.Text(16)},
		{"CA certificate", ca.Cert.Raw, ca.Cert.SerialNumber.Text(16)},
		{"garbage", []byte("not DER"), "?"},
		{"truncated", leaf[:10], "?"},
		{"empty", nil, "?"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := leafSerial(tt.chain); got != tt.want {
				t.Errorf("leafSerial = %q, want %q", got, tt.want)
			}
		})
	}
}

func BenchmarkAuditFacts(b *testing.B) {
	ca := newTestCA(b)
	resp := ca.svidResponse(b, "/web")
	for b.Loop() {
		auditFacts(resp)
	}
}

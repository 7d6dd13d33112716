package workloadapi

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"
	"weak"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestPendingCaller: a caller entitled to an SVID that is being signed
// (its entry was just edited) is never refused PermissionDenied and never
// handed anything but the new SVID: it waits, and is told Unavailable if
// the SVID does not come in time.
func TestPendingCaller(t *testing.T) {
	ca := newTestCA(t)
	tests := []struct {
		name     string
		pending  bool
		arrives  bool // the SVID is signed while the caller waits
		wantCode codes.Code
		wantLog  string
	}{
		{name: "signed while waiting", pending: true, arrives: true, wantCode: codes.OK, wantLog: `"@message":"served X.509-SVIDs"`},
		{name: "not signed in time", pending: true, wantCode: codes.Unavailable, wantLog: `"reason":"the caller's SVID is not signed yet"`},
		{name: "not entitled", wantCode: codes.PermissionDenied, wantLog: `"reason":"no entry matches the caller's selectors"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := &askedSource{fakeSource: newFakeSource(ca.bundlesResponse()), asked: make(chan struct{})}
			src.setPending(uidSelector(), tc.pending)
			wait := 300 * time.Millisecond
			if tc.arrives {
				wait = time.Minute // the SVID must come through the wait, not a retry
			}
			srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, PendingWait: wait})
			if tc.arrives {
				resp := ca.svidResponse(t, "/web")
				go func() {
					<-src.asked // the caller is waiting now
					src.setPending(uidSelector(), false)
					src.set(uidSelector(), resp)
				}()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			svid, err := newClient(t, srv.path).FetchX509SVID(ctx)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("status code = %v (%v), want %v", got, err, tc.wantCode)
			}
			if tc.wantCode == codes.OK && svid.ID.String() != "spiffe://example.org/web" {
				t.Errorf("got %s, want spiffe://example.org/web", svid.ID)
			}
			srv.logs.waitFor(t, tc.wantLog)
		})
	}
}

// TestStreamReleasesReplacedSVID: once the caller's SVID is replaced
// (here its entry changed and the new SVID is being signed), nothing the
// server holds for its stream keeps the old response, and its private key,
// alive while the stream waits.
func TestStreamReleasesReplacedSVID(t *testing.T) {
	ca := newTestCA(t)
	src := &askedSource{fakeSource: newFakeSource(ca.bundlesResponse()), asked: make(chan struct{})}
	first := ca.svidResponse(t, "/web")
	old := weak.Make(first)
	src.set(uidSelector(), first)
	first = nil
	srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, PendingWait: time.Minute})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ids := make(chan string, 4)
	done := make(chan error, 1)
	go func() { done <- newClient(t, srv.path).WatchX509Context(ctx, watcher{ids: ids}) }()
	defer func() { cancel(); <-done }()
	next := func() string {
		t.Helper()
		select {
		case id := <-ids:
			return id
		case <-time.After(10 * time.Second):
			t.Fatal("no update within 10s")
			return ""
		}
	}
	if got := next(); got != "spiffe://example.org/web" {
		t.Fatalf("first update = %s", got)
	}
	src.setPending(uidSelector(), true)
	src.set(uidSelector(), nil) // the entry changed: its old SVID is dropped
	<-src.asked                 // and the stream waits for the new one
	deadline := time.Now().Add(10 * time.Second)
	for old.Value() != nil {
		if time.Now().After(deadline) {
			t.Fatal("the replaced response (and its key) is still reachable while the stream waits")
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	src.setPending(uidSelector(), false)
	src.set(uidSelector(), ca.svidResponse(t, "/db"))
	if got := next(); got != "spiffe://example.org/db" {
		t.Fatalf("second update = %s", got)
	}
}

// askedSource closes asked the first time a caller is found pending.
type askedSource struct {
	*fakeSource
	once  sync.Once
	asked chan struct{}
}

func (s *askedSource) Pending(selectors []string) bool {
	p := s.fakeSource.Pending(selectors)
	if p {
		s.once.Do(func() { close(s.asked) })
	}
	return p
}

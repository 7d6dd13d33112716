package workloadapi

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// testCA mints real SVIDs, so the client parses and verifies what it gets.
type testCA struct{ *testca.CA }

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	return &testCA{testca.New(t, "test CA", td)}
}

// svidResponse returns a response holding one fresh SVID for path.
func (ca *testCA) svidResponse(t testing.TB, path string) *workload.X509SVIDResponse {
	t.Helper()
	id := spiffeid.RequireFromPath(td, path)
	cert, key := ca.SVID(t, id, nil)
	return &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId:    id.String(),
		X509Svid:    cert.Raw,
		X509SvidKey: testca.PKCS8(t, key),
		Bundle:      ca.Cert.Raw,
	}}}
}

func (ca *testCA) bundlesResponse() *workload.X509BundlesResponse {
	return &workload.X509BundlesResponse{Bundles: map[string][]byte{td.IDString(): ca.Cert.Raw}}
}

// fakeSource serves responses keyed by one selector each; set replaces one
// and wakes every stream, as the agent's cache would.
type fakeSource struct {
	mu      sync.Mutex
	svids   map[string]*workload.X509SVIDResponse
	pending map[string]bool // selectors whose SVID is being signed
	bundles *workload.X509BundlesResponse
	// federated are the bundles (own and federated) of callers with a
	// selector, as an entry with federates_with gives them.
	federated map[string]*workload.X509BundlesResponse
	changed   chan struct{}
}

func newFakeSource(bundles *workload.X509BundlesResponse) *fakeSource {
	return &fakeSource{svids: map[string]*workload.X509SVIDResponse{}, bundles: bundles, changed: make(chan struct{})}
}

func (s *fakeSource) X509SVIDResponse(selectors []string) (*workload.X509SVIDResponse, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sel := range selectors {
		if r, ok := s.svids[sel]; ok {
			return r, s.changed
		}
	}
	return nil, s.changed
}

// Pending implements pendingSource.
func (s *fakeSource) Pending(selectors []string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sel := range selectors {
		if s.pending[sel] {
			return true
		}
	}
	return false
}

// setPending marks a selector as entitled to an SVID being signed.
func (s *fakeSource) setPending(selector string, pending bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending == nil {
		s.pending = map[string]bool{}
	}
	s.pending[selector] = pending
}

func (s *fakeSource) X509BundlesResponse() (*workload.X509BundlesResponse, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundles, s.changed
}

func (s *fakeSource) X509BundlesFor(selectors []string) (*workload.X509BundlesResponse, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sel := range selectors {
		if r, ok := s.federated[sel]; ok {
			return r, s.changed
		}
	}
	return s.bundles, s.changed
}

// setFederated gives callers with selector r as their bundles and wakes
// every stream.
func (s *fakeSource) setFederated(selector string, r *workload.X509BundlesResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.federated == nil {
		s.federated = map[string]*workload.X509BundlesResponse{}
	}
	s.federated[selector] = r
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *fakeSource) set(selector string, r *workload.X509SVIDResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.svids[selector] = r
	close(s.changed)
	s.changed = make(chan struct{})
}

// logBuffer collects log output safely while the server writes it.
type logBuffer struct{ testlog.Buffer }

// waitFor polls until the logs contain want, and returns them.
func (b *logBuffer) waitFor(t *testing.T, want string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		logs := b.String()
		if strings.Contains(logs, want) {
			return logs
		}
		if time.Now().After(deadline) {
			t.Fatalf("logs lack %s after 10s:\n%s", want, logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// socketDir returns a short directory for sockets (sun_path is 108 bytes).
func socketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

var errRunHung = errors.New("Run did not return within 10s of cancel")

// running is a Server under test.
type running struct {
	path   string
	server *Server
	logs   *logBuffer
	cancel context.CancelFunc
	done   chan error
}

// startServer runs a Server on a fresh socket until the test ends, and
// checks then that Run returned nil.
func startServer(t *testing.T, att Attestor, src Source) *running {
	t.Helper()
	return startServerAt(t, filepath.Join(socketDir(t), "w.sock"), att, src)
}

func startServerAt(t *testing.T, path string, att Attestor, src Source) *running {
	t.Helper()
	return startServerWith(t, Config{SocketPath: path, Attestor: att, Source: src})
}

// startServerWith runs a Server for cfg, logging to the returned buffer.
func startServerWith(t testing.TB, cfg Config) *running {
	t.Helper()
	r := &running{path: cfg.SocketPath, logs: &logBuffer{}, done: make(chan error, 1)}
	cfg.Log = hclog.New(&hclog.LoggerOptions{Output: r.logs, Level: hclog.Debug, JSONFormat: true})
	s := New(cfg)
	r.server = s
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- s.Run(ctx) }()
	select {
	case <-s.Ready():
	case err := <-r.done:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("server not ready after 10s")
	}
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return r
}

// stop cancels Run and returns its result; it may be called twice.
func (r *running) stop() error {
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok {
			close(r.done)
		}
		return err
	case <-time.After(10 * time.Second):
		return errRunHung
	}
}

// clientOver returns a gRPC client whose one connection is the socket in
// f: a caller that holds a connection another process opened (inherited
// over fork or exec, or received over SCM_RIGHTS) and cannot dial again.
func clientOver(f *os.File) (*grpc.ClientConn, error) {
	conn, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	var once sync.Once
	dial := func(context.Context, string) (net.Conn, error) {
		var c net.Conn
		once.Do(func() { c = conn })
		if c == nil {
			return nil, errors.New("the one connection is used up")
		}
		return c, nil
	}
	return grpc.NewClient("passthrough:///caller", grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(dial))
}

package workloadapi

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	wlclient "github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
)

func uidSelector() string { return "unix:uid:" + strconv.Itoa(os.Getuid()) }

// failingAttestor stands for a caller that vanished before it was attested.
type failingAttestor struct{}

func (failingAttestor) Attest(context.Context, attestor.Process) ([]string, error) {
	return nil, errors.New("read exe: no such process")
}

func newClient(t *testing.T, path string) *wlclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wlclient.New(ctx, wlclient.WithAddr("unix://"+path))
	if err != nil {
		t.Fatalf("workloadapi.New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestFetchX509SVID(t *testing.T) {
	ca := newTestCA(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		attestor Attestor
		selector string // the entry's selector
		wantID   string
		wantCode codes.Code
		wantLog  string
	}{
		{name: "entitled by uid", attestor: unixOnly, selector: uidSelector(), wantID: "spiffe://example.org/web", wantLog: `"@message":"served X.509-SVIDs"`},
		{name: "entitled by exe path", attestor: unixOnly, selector: "unix:path:" + exe, wantID: "spiffe://example.org/web", wantLog: `"spiffe_ids":["spiffe://example.org/web"]`},
		{name: "not entitled", attestor: unixOnly, selector: "unix:uid:4242424", wantCode: codes.PermissionDenied, wantLog: `"@message":"no identity issued"`},
		{name: "attestation fails", attestor: failingAttestor{}, selector: uidSelector(), wantCode: codes.Unavailable, wantLog: `"error":"read exe: no such process"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource(ca.bundlesResponse())
			src.set(tc.selector, ca.svidResponse(t, "/web"))
			srv := startServer(t, tc.attestor, src)

			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			x509ctx, err := newClient(t, srv.path).FetchX509Context(ctx)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("status code = %v (%v), want %v", got, err, tc.wantCode)
			}
			if tc.wantCode == codes.OK {
				if got := x509ctx.DefaultSVID().ID.String(); got != tc.wantID {
					t.Errorf("SVID ID = %s, want %s", got, tc.wantID)
				}
				if _, ok := x509ctx.Bundles.Get(td); !ok {
					t.Errorf("no bundle for %s in the response", td)
				}
			}
			// The server logs after sending, so the line may trail the reply.
			logs := srv.logs.waitFor(t, tc.wantLog)
			if want := `"pid":` + strconv.Itoa(os.Getpid()); !strings.Contains(logs, want) {
				t.Errorf("logs lack %s:\n%s", want, logs)
			}
			if strings.Contains(logs, "PRIVATE KEY") {
				t.Errorf("logs hold a private key:\n%s", logs)
			}
		})
	}
}

// watcher forwards each update's default SVID ID.
type watcher struct{ ids chan string }

func (w watcher) OnX509ContextUpdate(c *wlclient.X509Context) { w.ids <- c.DefaultSVID().ID.String() }
func (w watcher) OnX509ContextWatchError(error)               {}

func TestServerWatchX509ContextSeesUpdate(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	srv := startServer(t, unixOnly, src)
	client := newClient(t, srv.path)

	ctx, cancel := context.WithCancel(context.Background())
	w := watcher{ids: make(chan string, 4)}
	watchDone := make(chan error, 1)
	go func() { watchDone <- client.WatchX509Context(ctx, w) }()
	defer func() {
		cancel()
		<-watchDone
	}()

	next := func() string {
		t.Helper()
		select {
		case id := <-w.ids:
			return id
		case <-time.After(10 * time.Second):
			t.Fatal("no update within 10s")
			return ""
		}
	}
	if got := next(); got != "spiffe://example.org/web" {
		t.Fatalf("first update = %s, want spiffe://example.org/web", got)
	}
	src.set(uidSelector(), ca.svidResponse(t, "/db"))
	if got := next(); got != "spiffe://example.org/db" {
		t.Fatalf("second update = %s, want spiffe://example.org/db", got)
	}
}

func TestFetchX509Bundles(t *testing.T) {
	ca := newTestCA(t)
	tests := []struct {
		name     string
		bundles  *workload.X509BundlesResponse
		wantCode codes.Code
	}{
		{name: "bundle served", bundles: ca.bundlesResponse()},
		{name: "no bundle yet", bundles: nil, wantCode: codes.Unavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := startServer(t, unixOnly, newFakeSource(tc.bundles))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			set, err := newClient(t, srv.path).FetchX509Bundles(ctx)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("status code = %v (%v), want %v", got, err, tc.wantCode)
			}
			if tc.wantCode != codes.OK {
				return
			}
			b, ok := set.Get(td)
			if !ok {
				t.Fatalf("no bundle for %s", td)
			}
			if got := b.X509Authorities(); len(got) != 1 || !got[0].Equal(ca.Cert) {
				t.Errorf("bundle authorities = %d certs, want the test CA", len(got))
			}
		})
	}
}

// TestServerSecurityHeader calls with a raw client, which sends only the
// metadata the test gives it.
func TestServerSecurityHeader(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	srv := startServer(t, unixOnly, src)

	conn, err := grpc.NewClient("unix://"+srv.path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := workload.NewSpiffeWorkloadAPIClient(conn)

	calls := map[string]func(context.Context) error{
		"FetchX509SVID": func(ctx context.Context) error {
			s, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchX509Bundles": func(ctx context.Context) error {
			s, err := client.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchJWTSVID": func(ctx context.Context) error {
			_, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}})
			return err
		},
	}
	tests := []struct {
		name     string
		call     string
		header   []string // key, value
		wantCode codes.Code
	}{
		{name: "svid without header", call: "FetchX509SVID", wantCode: codes.InvalidArgument},
		{name: "svid with header false", call: "FetchX509SVID", header: []string{securityHeader, "false"}, wantCode: codes.InvalidArgument},
		{name: "svid with header", call: "FetchX509SVID", header: []string{securityHeader, "true"}, wantCode: codes.OK},
		{name: "bundles without header", call: "FetchX509Bundles", wantCode: codes.InvalidArgument},
		{name: "bundles with header", call: "FetchX509Bundles", header: []string{securityHeader, "true"}, wantCode: codes.OK},
		{name: "unary without header", call: "FetchJWTSVID", wantCode: codes.InvalidArgument},
		{name: "unary with header, not yet served", call: "FetchJWTSVID", header: []string{securityHeader, "true"}, wantCode: codes.Unimplemented},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if tc.header != nil {
				ctx = metadata.AppendToOutgoingContext(ctx, tc.header...)
			}
			err := calls[tc.call](ctx)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("status code = %v (%v), want %v", got, err, tc.wantCode)
			}
			if tc.wantCode == codes.InvalidArgument {
				if got := status.Convert(err).Message(); got != "security header missing from request" {
					t.Errorf("message = %q", got)
				}
			}
		})
	}
}

func TestServerRunPreparesSocket(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
	}{
		{name: "parent directory missing", prepare: func(*testing.T, string) {}},
		{name: "stale socket left behind", prepare: func(t *testing.T, path string) {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			leaveStaleSocket(t, path)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(socketDir(t), "run", "w.sock")
			tc.prepare(t, path)
			srv := startServerAt(t, path, unixOnly, newFakeSource(nil))

			fi, err := os.Stat(srv.path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Type() != fs.ModeSocket {
				t.Errorf("%s is %v, want a socket", path, fi.Mode())
			}
			if perm := fi.Mode().Perm(); perm&0o666 != 0o666 {
				t.Errorf("socket mode = %v, want every user to read and write", perm)
			}
			dir, err := os.Stat(filepath.Dir(path))
			if err != nil {
				t.Fatal(err)
			}
			if perm := dir.Mode().Perm(); perm != 0o755 {
				t.Errorf("socket directory mode = %v, want 0755", perm)
			}
		})
	}
}

func TestServerRunStopsWithOpenStream(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	srv := startServer(t, unixOnly, src)

	client := newClient(t, srv.path)
	w := watcher{ids: make(chan string, 4)}
	watchCtx, cancelWatch := context.WithCancel(context.Background())
	defer cancelWatch()
	go func() { _ = client.WatchX509Context(watchCtx, w) }()
	select {
	case <-w.ids:
	case <-time.After(10 * time.Second):
		t.Fatal("watch got nothing within 10s")
	}

	start := time.Now()
	if err := srv.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if took := time.Since(start); took >= gracefulStopTimeout {
		t.Errorf("Run took %v to return with a stream open; streams should end at once", took)
	}
	if _, err := os.Stat(srv.path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket still there after Run returned: %v", err)
	}
}

// leaveStaleSocket leaves a socket file at path that nobody listens on,
// as a crashed agent would.
func leaveStaleSocket(t *testing.T, path string) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestServerRunRefuses(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		wantErr string
	}{
		{
			name: "path is a regular file",
			prepare: func(t *testing.T, path string) {
				if err := os.WriteFile(path, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "exists and is not a socket",
		},
		{
			name: "socket in use",
			prepare: func(t *testing.T, path string) {
				ln, err := net.Listen("unix", path)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = ln.Close() })
			},
			wantErr: "in use by another server",
		},
		{
			name: "socket directory writable by others",
			prepare: func(t *testing.T, path string) {
				if err := os.Chmod(filepath.Dir(path), 0o777); err != nil {
					t.Fatal(err)
				}
				// A would-be squatter's stale socket stays where it is.
				leaveStaleSocket(t, path)
			},
			wantErr: "is writable by other users",
		},
		{
			name: "parent directory writable by others",
			prepare: func(t *testing.T, path string) {
				if err := os.Chmod(filepath.Dir(filepath.Dir(path)), 0o777); err != nil {
					t.Fatal(err)
				}
				leaveStaleSocket(t, path)
			},
			wantErr: "is writable by other users",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(socketDir(t), "sub", "w.sock")
			if err := os.Mkdir(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			tc.prepare(t, path)
			s := New(Config{SocketPath: path, Attestor: unixOnly, Source: newFakeSource(nil)})
			err := s.Run(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Run = %v, want an error containing %q", err, tc.wantErr)
			}
			if _, statErr := os.Lstat(path); statErr != nil {
				t.Errorf("Run removed what was at %s: %v", path, statErr)
			}
			select {
			case <-s.Ready():
				t.Error("Ready closed though Run never listened")
			default:
			}
		})
	}
}

func TestServerPeerCredentialsRefuseUnknownConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, _, err := (peerCredentials{}).ServerHandshake(a); !errors.Is(err, errNoPeerCred) {
		t.Fatalf("ServerHandshake = %v, want errNoPeerCred", err)
	}
}

// unixOnly attests callers with the unix attestor alone: enough for
// these tests, and what they expect to see.
var unixOnly = func() *attestor.Workload {
	w, err := attestor.New(attestor.Config{Attestors: []string{"unix"}})
	if err != nil {
		panic(err)
	}
	return w
}()

package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// startAdmin runs an admin server on path until the test ends and returns
// what it logged so far.
func startAdmin(t *testing.T, path, apiDir string) *jsonLog {
	t.Helper()
	logs := &jsonLog{}
	log := logs.logger()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("pong")) })
	s := &adminServer{path: path, apiDir: apiDir, log: log, handler: mux, ready: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("admin Run: %v", err)
		}
	})
	select {
	case <-s.ready:
	case err := <-done:
		t.Fatalf("admin Run: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("admin socket not ready in 5s")
	}
	return logs
}

// TestAdminSocketDirectory: the agent makes the admin socket's directory
// root-only (0700) and the socket 0600, and says so when the socket sits
// in the Workload API's directory, which every user can enter.
func TestAdminSocketDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the admin socket answers root only: run as root (CI does)")
	}
	base, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}

	t.Run("own directory", func(t *testing.T) {
		path := filepath.Join(base, "admin", "admin.sock")
		logs := startAdmin(t, path, base)
		for p, want := range map[string]os.FileMode{filepath.Dir(path): 0o700, path: 0o600} {
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != want {
				t.Errorf("%s: mode %o, want %o", p, st.Mode().Perm(), want)
			}
		}
		c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}}}
		resp, err := c.Get("http://agent/ping")
		if err != nil {
			t.Fatalf("GET /ping as root: %v", err)
		}
		resp.Body.Close()
		if strings.Contains(logs.String(), "shares the Workload API") {
			t.Errorf("warned about a directory of its own: %s", logs)
		}
	})
	t.Run("shared with the Workload API", func(t *testing.T) {
		logs := startAdmin(t, filepath.Join(base, "admin.sock"), base)
		if !strings.Contains(logs.String(), "shares the Workload API socket's directory") {
			t.Errorf("no warning for a shared directory; logged %q", logs.String())
		}
	})
	t.Run("directory others may write", func(t *testing.T) {
		open := filepath.Join(base, "open")
		if err := os.Mkdir(open, 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(open, 0o777) // past the umask
		s := &adminServer{path: filepath.Join(open, "a.sock"), log: hclog.NewNullLogger(), handler: http.NewServeMux(), ready: make(chan struct{})}
		if err := s.Run(context.Background()); !errors.Is(err, ErrUnsafeAdminDir) {
			t.Errorf("Run in a 0777 directory = %v, want ErrUnsafeAdminDir", err)
		}
		if _, err := os.Stat(s.path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket created in an unsafe directory: %v", err)
		}
	})
	t.Run("parent directory others may write", func(t *testing.T) {
		open := filepath.Join(base, "open-parent")
		if err := os.Mkdir(open, 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(open, 0o777)
		s := &adminServer{path: filepath.Join(open, "admin", "a.sock"), log: hclog.NewNullLogger(), handler: http.NewServeMux(), ready: make(chan struct{})}
		if err := s.Run(context.Background()); !errors.Is(err, ErrUnsafeAdminDir) {
			t.Errorf("Run under a 0777 parent = %v, want ErrUnsafeAdminDir", err)
		}
		if _, err := os.Stat(s.path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket created under an unsafe parent: %v", err)
		}
	})
}

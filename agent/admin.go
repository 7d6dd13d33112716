package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/peercred"
	"github.com/lanyard-dev/lanyard/internal/safedir"
)

// adminServer answers `lanyard-agent status`, `healthcheck` and `explain`
// over HTTP on a root-only Unix socket. Root-only twice over: the socket is
// mode 0600, and every connection's peer uid (SO_PEERCRED) must be 0, so
// loosened permissions do not open it to other users.
type adminServer struct {
	path    string
	apiDir  string // the Workload API socket's directory
	log     hclog.Logger
	handler http.Handler
	ready   chan struct{}
}

// ErrUnsafeAdminDir is returned when the admin socket's directory could be
// written by someone other than root, who could then replace the socket.
var ErrUnsafeAdminDir = errors.New("admin socket directory is writable by non-root users")

func (s *adminServer) Run(ctx context.Context) error {
	dir := filepath.Dir(s.path)
	// A directory of its own that only root may enter: the socket's mode
	// and the peer check are then a second and third line, not the only.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if err := checkAdminDir(dir); err != nil {
		return err
	}
	if dir == s.apiDir {
		s.log.Warn("the admin socket shares the Workload API socket's directory, which every user can enter; it stays root-only (mode 0600, peer uid checked), but a directory of its own is safer",
			"admin_socket_path", s.path, "default", DefaultAdminSocketPath)
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("admin socket: remove stale %s: %w", s.path, err)
	}
	// Bind with a umask that leaves no window in which the socket is open
	// to others before the chmod.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", s.path)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("admin socket: listen on %s: %w", s.path, err)
	}
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("admin socket: %w", err)
	}
	srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(rootOnly{ln.(*net.UnixListener), s.log}) }()
	close(s.ready)
	select {
	case err := <-errc:
		return fmt.Errorf("admin socket: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	<-errc
	os.Remove(s.path)
	return nil
}

// checkAdminDir refuses an admin socket directory that someone other than
// root could write, or that lies under one (safedir's rules).
func checkAdminDir(dir string) error {
	if err := safedir.Check(dir); err != nil {
		return fmt.Errorf("admin socket: %w: %w", ErrUnsafeAdminDir, err)
	}
	return nil
}

// rootOnly accepts only connections whose peer is root.
type rootOnly struct {
	*net.UnixListener
	log hclog.Logger
}

func (l rootOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, err := peercred.Read(c, false)
		if err == nil && cred.UID == 0 {
			return c, nil
		}
		l.log.Warn("admin connection refused: not root", "uid", cred.UID, "error", err)
		c.Close()
	}
}

// adminHandler serves the admin endpoints.
func (a *Agent) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.Report(time.Now()))
	})
	mux.HandleFunc("GET /v1/explain", a.serveExplain)
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

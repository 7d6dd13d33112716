package agent

import (
	"context"
	"encoding/json"
	"net/http"
	"path/filepath"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/adminsock"
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
var ErrUnsafeAdminDir = adminsock.ErrUnsafeDir

func (s *adminServer) Run(ctx context.Context) error {
	if dir := filepath.Dir(s.path); dir == s.apiDir {
		if err := adminsock.CheckDir(dir); err != nil {
			return err
		}
		s.log.Warn("the admin socket shares the Workload API socket's directory, which every user can enter; it stays root-only (mode 0600, peer uid checked), but a directory of its own is safer",
			"admin_socket_path", s.path, "default", DefaultAdminSocketPath)
	}
	ln, err := adminsock.Listen(s.path, s.log)
	if err != nil {
		return err
	}
	return adminsock.Serve(ctx, ln, s.path, s.handler, s.ready)
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

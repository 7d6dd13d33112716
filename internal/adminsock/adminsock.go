// Package adminsock is the plumbing both daemons' root-only admin sockets
// share: a directory of its own that only root (or the daemon's own user)
// may write, a socket of mode 0600 bound with no window in which it is
// open to others, and a listener that accepts only peers whose uid is 0
// (SO_PEERCRED), so loosened permissions do not open it to other users.
// The handlers served on it stay with each daemon.
package adminsock

import (
	"context"
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

// ErrUnsafeDir is returned when the admin socket's directory could be
// written by someone other than root, who could then replace the socket.
var ErrUnsafeDir = errors.New("admin socket directory is writable by non-root users")

// Listen creates path's directory (0700) when missing, refuses it when it
// is unsafe (ErrUnsafeDir), replaces a stale socket and listens on path
// with mode 0600. The listener accepts root's connections only, and logs
// each refused one on log.
func Listen(path string, log hclog.Logger) (net.Listener, error) {
	dir := filepath.Dir(path)
	// A directory of its own that only root may enter: the socket's mode
	// and the peer check are then a second and third line, not the only.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := CheckDir(dir); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("admin socket: remove stale %s: %w", path, err)
	}
	// Bind with a umask that leaves no window in which the socket is open
	// to others before the chmod.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return rootOnly{ln.(*net.UnixListener), log}, nil
}

// CheckDir refuses an admin socket directory that someone other than
// root could write, or that lies under one (safedir's rules).
func CheckDir(dir string) error {
	if err := safedir.Check(dir); err != nil {
		return fmt.Errorf("admin socket: %w: %w", ErrUnsafeDir, err)
	}
	return nil
}

// Serve serves h over HTTP on ln until ctx ends, then shuts the server
// down (2 s for requests in flight) and removes the socket file at path.
// ready, when not nil, is closed once connections are being served.
func Serve(ctx context.Context, ln net.Listener, path string, h http.Handler, ready chan<- struct{}) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(peerConn); ok {
				return context.WithValue(ctx, credKey{}, pc.cred)
			}
			return ctx
		}}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	if ready != nil {
		close(ready)
	}
	select {
	case err := <-errc:
		os.Remove(path)
		return fmt.Errorf("admin socket: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	<-errc
	os.Remove(path)
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
			return peerConn{c, cred}, nil
		}
		l.log.Warn("admin connection refused: not root", "uid", cred.UID, "error", err)
		c.Close()
	}
}

// peerConn is an accepted connection and its peer's credentials.
type peerConn struct {
	*net.UnixConn
	cred peercred.Cred
}

type credKey struct{}

// Peer returns the credentials of the admin client that sent r, for audit
// lines; ok is false for a request that did not come through Listen.
func Peer(r *http.Request) (cred peercred.Cred, ok bool) {
	cred, ok = r.Context().Value(credKey{}).(peercred.Cred)
	return cred, ok
}

// Client is an HTTP client of the admin socket at path: the commands
// (`status`, `explain`, `node ...`) reach their daemon through it.
func Client(path string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}
}

// ErrNotRoot is what a user other than root meets at an admin socket.
var ErrNotRoot = errors.New("permission denied: the admin socket is root-only; run as root")

// Refused reports whether err, from a Client call, means the admin socket
// turned this user away: the socket's mode refused the connect (EACCES),
// or, should the mode have been loosened, the daemon hung up on a peer
// other than root (which a client sees as EOF, a reset, or "server closed
// idle connection", depending on timing). For root, and for "nothing is
// there" (no socket, nobody listening), it is false: the daemon is simply
// not running.
func Refused(err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return true
	case os.Geteuid() == 0, errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return false
	}
	return true
}

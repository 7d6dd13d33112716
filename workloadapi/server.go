// Package workloadapi serves the SPIFFE Workload API on a local Unix
// socket. Each connection carries its caller's kernel credentials from the
// moment it is accepted; each call attests that caller and streams what the
// Source says it is entitled to.
//
// Size: past the ~800-line guide, as it holds the whole Workload API (X.509,
// JWT, token validation) behind one socket; a split would only export its
// internals.
package workloadapi

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/grpcstop"
	"github.com/lanyard-dev/lanyard/internal/safedir"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
)

// gracefulStopTimeout bounds how long Run waits for calls in flight to
// finish before cutting connections. Streams end at once on shutdown, so
// this only covers a call that is mid-attestation or mid-send.
const gracefulStopTimeout = 2 * time.Second

// Config is what a Server needs.
type Config struct {
	// SocketPath is the Unix socket to listen on.
	SocketPath string
	// Attestor turns a caller into selectors.
	Attestor Attestor
	// Source gives the responses to serve.
	Source Source
	// JWT mints JWT-SVIDs and gives the JWT bundles; nil leaves the JWT
	// methods Unimplemented.
	JWT JWTSource
	// Tokens holds the token revocations in force and remembers the
	// action tokens ValidateJWTSVID accepted (single use); nil means a
	// guard of its own with no revocations.
	Tokens *TokenGuard
	// Log receives one line per served or refused call (the caller names
	// it, e.g. log.Named("workloadapi")); nil discards.
	Log hclog.Logger
	// Observer, when set, is told of every call, stream and caller
	// attestation (the agent's metrics and status); nil ignores them. If
	// it is also a LimitObserver, it is told of every refusal.
	Observer Observer
	// Healthy says whether the agent can serve (it holds a valid SVID for
	// some entry): the gRPC health service on the socket reports SERVING
	// while it does. Nil means always SERVING.
	Healthy func() bool
	// PendingWait is how long a caller entitled to an X.509-SVID that is
	// being signed (its entry was just added or edited) waits for it
	// before it is told Unavailable; 0 means 3 s. It applies only to a
	// Source that reports such callers (Pending).
	PendingWait time.Duration
	// Limits bounds the connections and calls callers can hold; the zero
	// value sets no limit.
	Limits Limits
	// SDS names the resources of the Envoy SDS v3 service served on the
	// same socket (sds.go); the zero value serves SPIRE's names and no
	// ROOTCA (it needs TrustDomain).
	SDS SDSConfig
}

// Server is the Workload API server. Run it once.
type Server struct {
	cfg       Config
	log       hclog.Logger
	limits    *limiter
	warn      *warnLimiter
	exits     *exitWatcher // set by Run, before ready closes
	ready     chan struct{}
	readyOnce sync.Once
}

// New returns a Server for cfg. It does not touch the socket until Run.
func New(cfg Config) *Server {
	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	warn := newWarnLimiter(log, cfg.Limits.WarnInterval)
	obs, _ := cfg.Observer.(LimitObserver)
	return &Server{cfg: cfg, log: log, warn: warn, limits: newLimiter(cfg.Limits, obs, warn), ready: make(chan struct{})}
}

// Exhaustion lists the limits callers reached now or within the last
// minute, and accept failures in that time (for status).
func (s *Server) Exhaustion(now time.Time) []Exhaustion { return s.limits.Exhaustion(now) }

// Ready is closed once the socket is listening.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Run listens on SocketPath and serves until ctx ends, then stops
// gracefully (cutting connections after a short bound), removes the socket
// and returns once its goroutines have ended. It returns nil on a clean
// shutdown.
//
// A stale socket file is replaced and a missing parent directory is
// created (0755). The socket is made 0666 so that every local user can
// connect: the caller's attested identity, not file permissions, decides
// what it gets.
func (s *Server) Run(ctx context.Context) error {
	path := s.cfg.SocketPath
	exits, err := newExitWatcher(s.log)
	if err != nil {
		return fmt.Errorf("watch callers' exits: %w", err)
	}
	// Stopped last, once every handler has returned: a stream is never
	// told that its caller exited because the agent is stopping.
	defer exits.stop()
	s.exits = exits
	ln, err := listen(path)
	if err != nil {
		return err
	}
	opts := []grpc.ServerOption{
		grpc.Creds(peerCredentials{}),
		// Limits first, so a refused call costs no header check, and
		// observed, so refusals are counted by code.
		grpc.ChainUnaryInterceptor(observeUnary(s.cfg.Observer), limitUnary, headerUnary),
		grpc.ChainStreamInterceptor(observeStream(s.cfg.Observer), limitStream(ctx.Done()), headerStream),
		// So that Run returns only after every handler has.
		grpc.WaitForHandlers(true),
		// gRPC's default 32 KiB read buffer is taken from a pool only
		// while a connection has data to read (peerConn.ReadOnReady,
		// readready.go), so an idle stream holds none.
		//
		// And the write buffer is taken from a pool for each flush.
		grpc.SharedWriteBuffer(true),
		// A fixed 64 KiB flow-control window, gRPC's default size, without
		// its bandwidth-delay estimator: that answers a client's first DATA
		// frame with a PING and a WINDOW_UPDATE, an extra write and read on
		// both sides of every one-shot call, to size windows for links
		// slower than a local socket. Workload API messages are a few KiB.
		grpc.StaticConnWindowSize(65535),
	}
	if n := s.cfg.Limits.MaxStreamsPerConn; n > 0 {
		// A backstop for clients that ignore SETTINGS: gRPC resets
		// streams past twice the cap, which the interceptor refuses with
		// ResourceExhausted from the cap on (at the cap itself gRPC would
		// make polite clients queue, not fail).
		opts = append(opts, grpc.MaxConcurrentStreams(uint32(2*n)))
	}
	srv := grpc.NewServer(opts...)
	h := &handler{
		attestor:    s.cfg.Attestor,
		source:      s.cfg.Source,
		jwt:         s.cfg.JWT,
		tokens:      cmp.Or(s.cfg.Tokens, NewTokenGuard(0)),
		log:         s.log,
		observer:    s.cfg.Observer,
		warn:        s.warn,
		stopping:    ctx.Done(),
		pendingWait: cmp.Or(s.cfg.PendingWait, defaultPendingWait),
	}
	workload.RegisterSpiffeWorkloadAPIServer(srv, h)
	// Envoy's SDS, on the same socket and for the same callers (sds.go).
	secretv3.RegisterSecretDiscoveryServiceServer(srv, &sdsHandler{h: h, cfg: s.cfg.SDS.withDefaults()})
	// The SPIFFE spec recommends reflection, so that grpcurl and friends
	// can list the API; it serves only the public proto descriptors.
	if err := registerReflection(srv); err != nil {
		_ = ln.Close()
		return err
	}
	serveHealth(ctx, srv, s.cfg.Source, s.cfg.Healthy)

	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(limitListener{Listener: peerListener{UnixListener: ln, warn: s.warn, exits: exits}, l: s.limits})
	}()
	s.readyOnce.Do(func() { close(s.ready) })
	lim := s.cfg.Limits
	s.log.Info("serving the Workload API", "socket", path, "max_connections", lim.MaxConns,
		"max_connections_per_uid", lim.MaxConnsPerUID, "max_streams_per_connection", lim.MaxStreamsPerConn,
		"max_streams_per_uid", lim.MaxStreamsPerUID, "idle_connection_timeout", lim.IdleTimeout.String())

	var runErr error
	select {
	case <-ctx.Done():
		grpcstop.Stop(srv, gracefulStopTimeout)
		<-served // nil once stopped
	case err := <-served:
		runErr = fmt.Errorf("serve %s: %w", path, err)
		grpcstop.Stop(srv, gracefulStopTimeout)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		runErr = errors.Join(runErr, fmt.Errorf("remove socket: %w", err))
	}
	s.log.Info("stopped serving the Workload API", "socket", path)
	return runErr
}

// listen creates the socket at path, replacing a stale one.
func listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	// Every local user trusts this socket to be the agent's, so nobody
	// else may be able to create, remove or rename it.
	if err := safedir.Check(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("open socket to all users: %w", err)
	}
	return ln, nil
}

// removeStale removes a socket left behind by an agent that is gone. It
// leaves anything else alone: a file that is not a socket is a
// misconfiguration, and a socket that answers belongs to a live server.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check socket path: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket path %s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		_ = c.Close()
		return fmt.Errorf("socket %s is in use by another server", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

package workloadapi

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Limits bounds what callers can make the server hold. The socket is open
// to every local user, so without them one user could take all of the
// agent's memory or file descriptors and starve every other caller. Zero
// means no limit; the agent's config supplies the defaults and their
// reasons (README "Limits").
type Limits struct {
	// MaxStreamsPerConn caps the calls (streams, unary calls included)
	// open at once on one connection. gRPC's MaxConcurrentStreams would
	// only make a client queue; a call past the cap is refused with
	// ResourceExhausted.
	MaxStreamsPerConn int
	// MaxStreamsPerUID caps the calls open at once by one uid over all its
	// connections.
	MaxStreamsPerUID int
	// MaxConnsPerUID caps the connections one uid holds open.
	MaxConnsPerUID int
	// MaxConns caps the connections held open in total. Each costs two
	// file descriptors (the socket and the caller's pidfd), so it must stay
	// below half of RLIMIT_NOFILE (see DefaultMaxConns).
	MaxConns int
	// IdleTimeout closes a connection that has opened no call this long
	// after it was accepted.
	IdleTimeout time.Duration
	// WarnInterval is how often a uid's warnings about refused or
	// abandoned calls are logged: the first at once, the rest as one line
	// with a count at the end of the interval. Zero logs every warning.
	WarnInterval time.Duration
}

// Refusal reasons: the values of the agent's refusals metric label and of
// Exhaustion.Limit.
const (
	LimitConns          = "connections_total"
	LimitConnsPerUID    = "connections_per_uid"
	LimitStreamsPerConn = "streams_per_connection"
	LimitStreamsPerUID  = "streams_per_uid"
	LimitIdle           = "idle_connection" // closed: no call in IdleTimeout
	LimitAccept         = "accept_failed"   // accept(2) failed, e.g. EMFILE
)

// fdsPerConn is what one connection costs: the socket and the pidfd.
const fdsPerConn = 2

// fdHeadroom is what DefaultMaxConns leaves for the agent's own files: the
// TPM, the signer and admin connections, the telemetry listeners, the
// config and bundle watches, logs, and a listening socket that can still
// accept (and refuse) while the caps are reached.
const fdHeadroom = 256

// DefaultMaxConns derives MaxConns from the process's RLIMIT_NOFILE soft
// limit (Go raises it to the hard limit at start): what is left after
// fdHeadroom, at two descriptors per connection, so the agent never runs
// out of descriptors however many connections callers open.
func DefaultMaxConns() (int, error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 0, fmt.Errorf("read RLIMIT_NOFILE: %w", err)
	}
	return ConnsForFDs(rl.Cur), nil
}

// ConnsForFDs is DefaultMaxConns for a soft limit of fds descriptors; at
// least 16, so a tiny limit still serves a few callers.
func ConnsForFDs(fds uint64) int {
	if fds > 1<<30 {
		fds = 1 << 30
	}
	return max(16, (int(fds)-fdHeadroom)/fdsPerConn)
}

// pressureWindow is how long Exhaustion remembers a refusal or an accept
// failure: a status taken a minute after an attack still shows it.
const pressureWindow = time.Minute

// Exhaustion is one limit reached now or within the last minute, for the
// agent's status.
type Exhaustion struct {
	Limit string    // one of the Limit* reasons
	UID   int64     // the uid concerned; -1 for connections_total and accept_failed
	Cap   int       // the limit's value (0 for accept_failed)
	Now   bool      // the uid (or the server) is at the cap right now
	Last  time.Time // the last refusal; zero if none yet (Now is set)
	Error string    // accept_failed: the last error
}

// LimitObserver is told of every refusal and accept failure (the agent's
// metrics). Like Observer, it must be cheap and must not block.
type LimitObserver interface {
	Refused(reason string)
}

// limiter counts connections and calls per uid and in total.
type limiter struct {
	lim  Limits
	obs  LimitObserver
	warn *warnLimiter

	// parked counts push streams holding their next message until the
	// last has left (a client that does not read); for tests and status.
	parked atomic.Int64

	mu        sync.Mutex
	conns     int
	uids      map[uint32]*uidCount
	recent    map[exhaustionKey]time.Time
	acceptErr string
	acceptAt  time.Time
}

type uidCount struct{ conns, calls int }

type exhaustionKey struct {
	limit string
	uid   int64
}

func newLimiter(lim Limits, obs LimitObserver, warn *warnLimiter) *limiter {
	return &limiter{lim: lim, obs: obs, warn: warn, uids: map[uint32]*uidCount{}, recent: map[exhaustionKey]time.Time{}}
}

// refusedLocked remembers a refusal for Exhaustion; l.mu is held.
func (l *limiter) refusedLocked(limit string, uid int64, now time.Time) {
	l.recent[exhaustionKey{limit, uid}] = now
	if len(l.recent) > 4096 {
		l.pruneLocked(now)
	}
}

func (l *limiter) pruneLocked(now time.Time) {
	for k, at := range l.recent {
		if now.Sub(at) > pressureWindow {
			delete(l.recent, k)
		}
	}
}

func (l *limiter) report(limit string, uid uint32, msg string, kv ...any) {
	if l.obs != nil {
		l.obs.Refused(limit)
	}
	l.warn.Warn(uid, msg, append([]any{"uid", uid, "limit", limit}, kv...)...)
}

// acceptFailed records a failed accept(2): while it lasts no caller is
// served, which status must say.
func (l *limiter) acceptFailed(err error) {
	l.mu.Lock()
	l.acceptErr, l.acceptAt = err.Error(), time.Now()
	l.mu.Unlock()
	if l.obs != nil {
		l.obs.Refused(LimitAccept)
	}
	// Not per uid: the kernel names no caller for a failed accept.
	l.warn.Warn(unknownUID, "cannot accept Workload API connections", "error", err)
}

// admit counts a new connection of uid, or says which cap refuses it.
func (l *limiter) admit(uid uint32) (ok bool, limit string, cap int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	u := l.uids[uid]
	switch {
	case l.lim.MaxConns > 0 && l.conns >= l.lim.MaxConns:
		l.refusedLocked(LimitConns, -1, now)
		return false, LimitConns, l.lim.MaxConns
	case l.lim.MaxConnsPerUID > 0 && u != nil && u.conns >= l.lim.MaxConnsPerUID:
		l.refusedLocked(LimitConnsPerUID, int64(uid), now)
		return false, LimitConnsPerUID, l.lim.MaxConnsPerUID
	}
	if u == nil {
		u = &uidCount{}
		l.uids[uid] = u
	}
	l.conns++
	u.conns++
	return true, "", 0
}

// release uncounts a connection of uid.
func (l *limiter) release(uid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.conns--
	l.uidDone(uid, func(u *uidCount) { u.conns-- })
}

func (l *limiter) uidDone(uid uint32, f func(*uidCount)) {
	if u := l.uids[uid]; u != nil {
		f(u)
		if u.conns <= 0 && u.calls <= 0 {
			delete(l.uids, uid)
		}
	}
}

// Exhaustion lists the limits reached now or within pressureWindow.
func (l *limiter) Exhaustion(now time.Time) []Exhaustion {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pruneLocked(now)
	var out []Exhaustion
	seen := map[exhaustionKey]bool{}
	add := func(limit string, uid int64, cap int, atCap bool) {
		k := exhaustionKey{limit, uid}
		last, recent := l.recent[k]
		if (atCap || recent) && !seen[k] {
			seen[k] = true
			out = append(out, Exhaustion{Limit: limit, UID: uid, Cap: cap, Now: atCap, Last: last})
		}
	}
	if !l.acceptAt.IsZero() && now.Sub(l.acceptAt) <= pressureWindow {
		out = append(out, Exhaustion{Limit: LimitAccept, UID: -1, Last: l.acceptAt, Error: l.acceptErr})
	}
	add(LimitConns, -1, l.lim.MaxConns, l.lim.MaxConns > 0 && l.conns >= l.lim.MaxConns)
	for uid, u := range l.uids {
		add(LimitConnsPerUID, int64(uid), l.lim.MaxConnsPerUID, l.lim.MaxConnsPerUID > 0 && u.conns >= l.lim.MaxConnsPerUID)
		add(LimitStreamsPerUID, int64(uid), l.lim.MaxStreamsPerUID, l.lim.MaxStreamsPerUID > 0 && u.calls >= l.lim.MaxStreamsPerUID)
	}
	for k := range l.recent {
		switch k.limit {
		case LimitConnsPerUID:
			add(k.limit, k.uid, l.lim.MaxConnsPerUID, false)
		case LimitStreamsPerUID:
			add(k.limit, k.uid, l.lim.MaxStreamsPerUID, false)
		case LimitStreamsPerConn:
			add(k.limit, k.uid, l.lim.MaxStreamsPerConn, false)
		}
	}
	return out
}

// connState is the limiter's view of one accepted connection.
type connState struct {
	l     *limiter
	uid   uint32
	calls int         // under l.mu
	used  bool        // a call was opened (under l.mu)
	idle  *time.Timer // under l.mu
	out   *sendTracker
}

// openCall counts a call on c, or refuses it with ResourceExhausted.
func (c *connState) openCall() error {
	l := c.l
	l.mu.Lock()
	now := time.Now()
	u := l.uids[c.uid]
	var limit string
	var cap int
	switch {
	case l.lim.MaxStreamsPerConn > 0 && c.calls >= l.lim.MaxStreamsPerConn:
		limit, cap = LimitStreamsPerConn, l.lim.MaxStreamsPerConn
	case l.lim.MaxStreamsPerUID > 0 && u != nil && u.calls >= l.lim.MaxStreamsPerUID:
		limit, cap = LimitStreamsPerUID, l.lim.MaxStreamsPerUID
	}
	if limit != "" {
		l.refusedLocked(limit, int64(c.uid), now)
		l.mu.Unlock()
		l.report(limit, c.uid, "refused call: limit reached", "cap", cap)
		return status.Errorf(codes.ResourceExhausted, "too many open calls (%s cap %d)", limit, cap)
	}
	c.calls++
	if u != nil {
		u.calls++
	}
	if !c.used {
		c.used = true
		if c.idle != nil {
			c.idle.Stop()
		}
	}
	l.mu.Unlock()
	return nil
}

// closeCall uncounts a call opened by openCall.
func (c *connState) closeCall() {
	c.l.mu.Lock()
	defer c.l.mu.Unlock()
	c.calls--
	c.l.uidDone(c.uid, func(u *uidCount) { u.calls-- })
}

// expire reports whether the connection is still unused at its deadline,
// and makes sure it stays so: a call racing it is refused by the close.
func (c *connState) expire() bool {
	c.l.mu.Lock()
	defer c.l.mu.Unlock()
	return !c.used
}

// limitListener applies the connection caps to what peerListener accepts,
// before gRPC reads a byte: a connection past a cap is closed at once.
type limitListener struct {
	net.Listener // a peerListener
	l            *limiter
}

// Accept returns the next connection within the caps.
func (ln limitListener) Accept() (net.Conn, error) {
	for {
		c, err := ln.Listener.Accept()
		if err != nil {
			ln.l.acceptFailed(err)
			return nil, err
		}
		pc, ok := c.(*peerConn)
		if !ok {
			return c, nil // ServerHandshake refuses it
		}
		uid := pc.proc.UID
		if ok, limit, cap := ln.l.admit(uid); !ok {
			// Counted before the close, so whoever sees the close sees
			// the count.
			ln.l.report(limit, uid, "refused connection: limit reached", "cap", cap, "pid", pc.proc.PID)
			_ = pc.Close()
			continue
		}
		return ln.l.wrap(pc), nil
	}
}

// wrap gives an admitted connection its state, its idle deadline and its
// frame tracker.
func (l *limiter) wrap(pc *peerConn) *limitedConn {
	c := &limitedConn{peerConn: pc, state: &connState{l: l, uid: pc.proc.UID, out: newSendTracker(&l.parked)}}
	if d := l.lim.IdleTimeout; d > 0 {
		// Real clients open a call right after they connect (go-spiffe
		// dials on the first call), so an unused connection is someone
		// holding a descriptor of ours.
		l.mu.Lock() // idle is under l.mu: the timer's Close and openCall read it
		c.state.idle = time.AfterFunc(d, func() {
			if c.state.expire() {
				l.report(LimitIdle, c.state.uid, "closed idle connection", "pid", pc.proc.PID, "after", d.String())
				_ = c.Close()
			}
		})
		l.mu.Unlock()
	}
	return c
}

// limitedConn is an admitted connection: it feeds what gRPC writes to the
// frame tracker and gives its place back when closed.
type limitedConn struct {
	*peerConn
	state *connState
	once  sync.Once
	err   error
}

// Write writes p and tells the tracker what left.
func (c *limitedConn) Write(p []byte) (int, error) {
	n, err := c.peerConn.Write(p)
	if n > 0 {
		c.state.out.wrote(p[:n])
	}
	return n, err
}

// Close closes the connection once and gives back its place.
func (c *limitedConn) Close() error {
	c.once.Do(func() {
		c.state.l.mu.Lock()
		if c.state.idle != nil {
			c.state.idle.Stop()
		}
		c.state.l.mu.Unlock()
		c.err = c.peerConn.Close()
		c.state.l.release(c.state.uid)
	})
	return c.err
}

// peerConnOf finds the accepted connection under c, and its limits state
// when it went through limitListener.
func peerConnOf(c net.Conn) (*peerConn, *connState) {
	switch c := c.(type) {
	case *peerConn:
		return c, nil
	case *limitedConn:
		return c.peerConn, c.state
	}
	return nil, nil
}

// connFromContext returns the limits state of the call's connection, or
// nil.
func connFromContext(ctx context.Context) *connState {
	info, _ := callerInfoFrom(ctx)
	return info.conn
}

// limitStream counts each streaming call against the caps, and makes a
// server-streaming call (the push streams) send each message only once the
// previous one has left (see sendtrack.go).
func limitStream(stop <-chan struct{}) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		c := connFromContext(ss.Context())
		if c == nil {
			return next(srv, ss)
		}
		if err := c.openCall(); err != nil {
			return err
		}
		defer c.closeCall()
		// The push streams: server streams, and SDS's bidirectional one,
		// whose requests are only subscriptions and ACKs.
		if !info.IsServerStream || (info.IsClientStream && !isSDSMethod(info.FullMethod)) {
			return next(srv, ss)
		}
		out := c.out.register()
		defer out.unregister()
		ts := &trackedStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), outKey{}, out), out: out, stop: stop}
		return next(srv, ts)
	}
}

// limitUnary counts each unary call against the caps.
func limitUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	c := connFromContext(ctx)
	if c == nil {
		return next(ctx, req)
	}
	if err := c.openCall(); err != nil {
		return nil, err
	}
	defer c.closeCall()
	return next(ctx, req)
}

// errShuttingDown ends a stream when the server stops: Unavailable makes
// clients reconnect, to this agent's successor.
var errShuttingDown = status.Error(codes.Unavailable, "agent is shutting down")

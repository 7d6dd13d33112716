package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/lanyard-dev/lanyard/attestor/workload"
	"github.com/lanyard-dev/lanyard/internal/peercred"
)

// errNoPeerCred refuses a connection that did not come through peerListener:
// without the kernel's word on who is calling, nothing can be attested.
var errNoPeerCred = errors.New("connection carries no peer credentials")

// peerListener takes each caller's identity from its connection as it is
// accepted, before any request is read: SO_PEERCRED (PID, uid, gid) and a
// pidfd that pins the process, which attestation later re-checks.
type peerListener struct {
	*net.UnixListener
	warn  *warnLimiter // refusals are rate-limited, as churn could flood the log
	exits *exitWatcher // watches the callers of the connections' streams
}

// Accept returns the next connection whose caller could be identified;
// the others are closed and logged, never handed to gRPC. A caller that is
// already gone still gets its connection, so that its calls fail with a
// clear Unavailable (a process that shares the socket may be listening).
func (l peerListener) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		proc, goneErr, err := peerProcess(c)
		if err != nil {
			// Unidentified, so no uid to count it under: all such
			// refusals share one rate limit.
			l.warn.Warn(unknownUID, "refused connection", "error", err)
			_ = c.Close()
			continue
		}
		raw, err := c.SyscallConn()
		if err != nil {
			l.warn.Warn(unknownUID, "refused connection", "error", err)
			_ = c.Close()
			if proc.PIDFD != nil {
				_ = proc.PIDFD.Close()
			}
			continue
		}
		return &peerConn{conn: c, readyRead: newReadyRead(raw), proc: proc, gone: goneErr, exit: newExitWatch(l.exits, proc.PIDFD)}, nil
	}
}

// peerProcess identifies the caller on c. gone is set (wrapping
// workload.ErrCallerExited) when the kernel says the caller has already
// exited; err when it cannot be identified at all.
func peerProcess(c *net.UnixConn) (proc workload.Process, gone, err error) {
	cred, err := peercred.Read(c, true)
	if err != nil {
		return workload.Process{}, nil, err
	}
	// The kernel reports PID 0 when the caller lives in a PID namespace we
	// cannot see into: there is no /proc entry to attest. Callers in child
	// namespaces (containers) appear under their PID in ours.
	if cred.PID <= 0 {
		if cred.PIDFD >= 0 {
			_ = unix.Close(cred.PIDFD)
		}
		return workload.Process{}, nil, fmt.Errorf("peer credentials: caller pid %d is not visible here", cred.PID)
	}
	return pinPeer(workload.Process{PID: cred.PID, UID: cred.UID, GID: cred.GID}, cred.PIDFD, cred.PIDFDErr)
}

// pinPeer gives proc the pidfd that getsockopt(SO_PEERPIDFD) returned, or
// when the kernel has no such option, one opened from the PID, and records
// what the process runs (workload.Identify), so that calls can refuse it
// once it has exec'd.
//
// The kernel records only pid, uid and gid at connect(2): a process that
// execs between its connect and this moment is recorded as the program it
// became (README, "Security model").
func pinPeer(proc workload.Process, pidfd int, pidfdErr error) (_ workload.Process, gone, err error) {
	switch {
	case pidfdErr == nil:
		// The pidfd of the very process that called connect(2).
		f, err := workload.NewPIDFD(pidfd)
		if err != nil {
			return workload.Process{}, nil, fmt.Errorf("peer credentials: %w", err)
		}
		proc.PIDFD = f
		id, err := workload.Identify(proc)
		if errors.Is(err, workload.ErrCallerExited) {
			_ = f.Close()
			proc.PIDFD = nil
			return proc, err, nil
		}
		if err != nil {
			_ = f.Close()
			return workload.Process{}, nil, fmt.Errorf("peer credentials: %w", err)
		}
		return id, nil, nil
	case errors.Is(pidfdErr, unix.ENOPROTOOPT):
		// Before Linux 6.5: pin whatever holds the PID now. A PID reused
		// between connect and this moment would go unnoticed unless its
		// new process has another uid or gid; from here on the pidfd and
		// the start time catch it.
		pinned, err := workload.PinPID(proc.PID)
		if errors.Is(err, workload.ErrCallerExited) {
			return proc, err, nil
		}
		if err != nil {
			return workload.Process{}, nil, fmt.Errorf("peer credentials: %w", err)
		}
		proc.PIDFD, proc.StartTime, proc.Exe = pinned.PIDFD, pinned.StartTime, pinned.Exe
		return proc, nil, nil
	case errors.Is(pidfdErr, unix.ESRCH), errors.Is(pidfdErr, unix.EINVAL):
		// Kernels that cannot give a pidfd for a peer that has exited
		// say so this way.
		return proc, fmt.Errorf("%w: getsockopt SO_PEERPIDFD: %w", workload.ErrCallerExited, pidfdErr), nil
	default:
		return workload.Process{}, nil, fmt.Errorf("peer credentials: getsockopt SO_PEERPIDFD: %w", pidfdErr)
	}
}

// peerConn is an accepted connection with its caller. It owns the caller's
// pidfd and closes it with the connection; an attestation still using it
// then sees the caller as gone.
//
// It is a plain net.Conn to gRPC, on purpose not a syscall.Conn: given one,
// gRPC's channelz reads four socket options per connection (SO_LINGER,
// the timeouts and TCP_INFO, which fails on a Unix socket) that nobody
// here looks at. Reads go through ReadOnReady.
type peerConn struct {
	conn       *net.UnixConn
	*readyRead // how gRPC reads it (readready.go)
	proc       workload.Process
	gone       error      // set when the caller had exited by accept
	exit       *exitWatch // shared by the connection's streams; owns proc.PIDFD
}

// Close closes the connection and the caller's pidfd. The pidfd is closed
// by its exitWatch alone, which first takes it out of the Server's
// exitWatcher (exitwatch.go).
func (c *peerConn) Close() error {
	return errors.Join(c.conn.Close(), c.exit.close())
}

// Read, Write, the addresses and the deadlines are the socket's own.

func (c *peerConn) Read(p []byte) (int, error)         { return c.conn.Read(p) }
func (c *peerConn) Write(p []byte) (int, error)        { return c.conn.Write(p) }
func (c *peerConn) LocalAddr() net.Addr                { return c.conn.LocalAddr() }
func (c *peerConn) RemoteAddr() net.Addr               { return c.conn.RemoteAddr() }
func (c *peerConn) SetDeadline(t time.Time) error      { return c.conn.SetDeadline(t) }
func (c *peerConn) SetReadDeadline(t time.Time) error  { return c.conn.SetReadDeadline(t) }
func (c *peerConn) SetWriteDeadline(t time.Time) error { return c.conn.SetWriteDeadline(t) }

// callerInfo is the gRPC AuthInfo of a Workload API connection, so every
// call on it can find its caller with peer.FromContext.
type callerInfo struct {
	credentials.CommonAuthInfo
	proc workload.Process
	gone error
	exit *exitWatch
	conn *connState // the connection's limits; nil when not limited
}

// AuthType implements credentials.AuthInfo.
func (callerInfo) AuthType() string { return "peercred" }

// callerFromContext returns the caller of the gRPC call in ctx, or why it
// cannot be attested: errNoPeerCred, or an error wrapping
// workload.ErrCallerExited when it was gone by accept.
func callerFromContext(ctx context.Context) (workload.Process, error) {
	info, ok := callerInfoFrom(ctx)
	if !ok {
		return workload.Process{}, errNoPeerCred
	}
	return info.proc, info.gone
}

// callerInfoFrom returns the AuthInfo of the call in ctx's connection; ok
// is false for a connection that did not come through peerListener.
func callerInfoFrom(ctx context.Context) (info callerInfo, ok bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return callerInfo{}, false
	}
	info, ok = p.AuthInfo.(callerInfo)
	return info, ok
}

// peerCredentials is a server-only, plaintext gRPC transport (the socket is
// local; the kernel, not a handshake, authenticates the peer) whose only
// job is to attach the credentials peerListener took as AuthInfo.
type peerCredentials struct{}

// ServerHandshake implements credentials.TransportCredentials.
func (peerCredentials) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	pc, limits := peerConnOf(c)
	if pc == nil {
		return nil, nil, errNoPeerCred
	}
	return c, callerInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		proc:           pc.proc,
		gone:           pc.gone,
		exit:           pc.exit,
		conn:           limits,
	}, nil
}

// ClientHandshake implements credentials.TransportCredentials; these
// credentials only serve.
func (peerCredentials) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peer credentials are server-side only")
}

// Info implements credentials.TransportCredentials.
func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}

// Clone implements credentials.TransportCredentials.
func (peerCredentials) Clone() credentials.TransportCredentials { return peerCredentials{} }

// OverrideServerName implements credentials.TransportCredentials.
func (peerCredentials) OverrideServerName(string) error { return nil }

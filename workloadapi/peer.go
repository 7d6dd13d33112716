package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/lanyard-dev/lanyard/attestor"
)

// errNoPeerCred refuses a connection that did not come through peerListener:
// without the kernel's word on who is calling, nothing can be attested.
var errNoPeerCred = errors.New("connection carries no peer credentials")

// peerListener takes SO_PEERCRED from each connection as it is accepted.
// The kernel records the credentials of whoever called connect(2); taking
// them with the connection, before any request is read, keeps short the
// window in which that PID could exit and be reused, and is where a pidfd
// will pin the process (a later addition).
type peerListener struct {
	*net.UnixListener
	log hclog.Logger
}

// Accept returns the next connection whose peer credentials could be read;
// the others are closed and logged, never handed to gRPC.
func (l peerListener) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		proc, err := peerCred(c)
		if err != nil {
			l.log.Warn("refused connection", "error", err)
			_ = c.Close()
			continue
		}
		return &peerConn{UnixConn: c, proc: proc}, nil
	}
}

// peerCred reads SO_PEERCRED from c.
func peerCred(c *net.UnixConn) (attestor.Process, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return attestor.Process{}, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return attestor.Process{}, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return attestor.Process{}, fmt.Errorf("peer credentials: getsockopt SO_PEERCRED: %w", credErr)
	}
	// The kernel reports PID 0 when the caller lives in a PID namespace we
	// cannot see into: there is no /proc entry to attest.
	if cred.Pid <= 0 {
		return attestor.Process{}, fmt.Errorf("peer credentials: caller pid %d is not visible here", cred.Pid)
	}
	return attestor.Process{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// peerConn is an accepted connection with its caller's credentials.
type peerConn struct {
	*net.UnixConn
	proc attestor.Process
}

// callerInfo is the gRPC AuthInfo of a Workload API connection, so every
// call on it can find its caller with peer.FromContext.
type callerInfo struct {
	credentials.CommonAuthInfo
	proc attestor.Process
}

// AuthType implements credentials.AuthInfo.
func (callerInfo) AuthType() string { return "peercred" }

// callerFromContext returns the caller of the gRPC call in ctx.
func callerFromContext(ctx context.Context) (attestor.Process, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return attestor.Process{}, false
	}
	info, ok := p.AuthInfo.(callerInfo)
	return info.proc, ok
}

// peerCredentials is a server-only, plaintext gRPC transport (the socket is
// local; the kernel, not a handshake, authenticates the peer) whose only
// job is to attach the credentials peerListener took as AuthInfo.
type peerCredentials struct{}

// ServerHandshake implements credentials.TransportCredentials.
func (peerCredentials) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	pc, ok := c.(*peerConn)
	if !ok {
		return nil, nil, errNoPeerCred
	}
	return c, callerInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		proc:           pc.proc,
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

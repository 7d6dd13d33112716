// Package peercred reads what the kernel recorded about the process at the
// other end of a Unix socket when it called connect(2): its pid, uid and
// gid (SO_PEERCRED) and, on Linux 6.5 and later, a pidfd naming that very
// process (SO_PEERPIDFD). It is the one place both of the agent's sockets
// learn who is calling: the Workload API (which attests the caller) and the
// admin socket (which serves only root).
package peercred

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// Cred is the kernel's account of a socket's peer.
type Cred struct {
	// PID, UID and GID are those of the process that called connect(2),
	// as seen from this process's namespaces; PID is 0 when the peer is
	// in a PID namespace this process cannot see into.
	PID      int32
	UID, GID uint32
	// PIDFD is the pidfd from SO_PEERPIDFD, which the caller owns and must
	// close, or -1 with PIDFDErr saying why (unix.ENOPROTOOPT before Linux
	// 6.5; ESRCH or EINVAL when the peer has exited). Only Read with
	// wantPIDFD set asks for one.
	PIDFD    int
	PIDFDErr error
}

// Read returns the peer credentials of c, and its pidfd when wantPIDFD is
// set. An error means the kernel named no peer (SO_PEERCRED failed).
func Read(c *net.UnixConn, wantPIDFD bool) (Cred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Cred{}, fmt.Errorf("peer credentials: %w", err)
	}
	out := Cred{PIDFD: -1}
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		var uc *unix.Ucred
		uc, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr != nil {
			return
		}
		out.PID, out.UID, out.GID = uc.Pid, uc.Uid, uc.Gid
		if wantPIDFD {
			out.PIDFD, out.PIDFDErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
			if out.PIDFDErr != nil {
				out.PIDFD = -1
			}
		}
	}); err != nil {
		return Cred{}, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return Cred{}, fmt.Errorf("peer credentials: getsockopt SO_PEERCRED: %w", credErr)
	}
	return out, nil
}

package workloadapi

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/lanyard-dev/lanyard/attestor/workload"
)

// An identity is bound to the process that connected, not to the
// connection: the descriptor can outlive that process (a fork holds it too,
// or it was passed over SCM_RIGHTS), and the process can become another
// program (execve) or user (setuid). So every call refuses a process that
// changed since it connected (attest, through workload.ErrCallerExeced and
// ErrCallerChanged), every push on a stream after a wait is preceded by
// workload.Process.Recheck, and a stream ends as soon as the process that
// connected exits, woken by its pidfd rather than by polling (one epoll
// instance per Server holds every caller's pidfd: exitwatch.go). What the
// owner hands over while it lives is its own choice; nothing survives it.

// exitGrace is how long a stream whose caller exited waits for its
// connection to close before it reports the exit. A process that exits
// closes its socket first, so the ordinary end of a client comes as a
// cancelled call within this time and logs nothing; only a connection
// still held by another process (a fork, an fd passed away) outlives it
// and earns the audit line. It stays well under the second within which
// such a stream must end.
const exitGrace = 200 * time.Millisecond

// callerExit returns the exit channel of the caller of the call in ctx.
func callerExit(ctx context.Context) <-chan struct{} {
	info, ok := callerInfoFrom(ctx)
	if !ok {
		return nil
	}
	return info.exit.exited()
}

// changeReason is the audit reason for a caller refused because it is no
// longer the process that connected, or "" for any other error.
func changeReason(err error) string {
	switch {
	case errors.Is(err, workload.ErrCallerExited):
		return "the caller exited"
	case errors.Is(err, workload.ErrCallerExeced):
		return "the caller ran another executable since it connected"
	case errors.Is(err, workload.ErrCallerChanged):
		return "the caller changed uid or gid since it connected"
	}
	return ""
}

// refuseChanged answers a call whose caller exec'd or changed uid or gid
// since it connected: PermissionDenied, since no retry on this connection
// can succeed, and an audit line that names what the process runs now.
func (h *handler) refuseChanged(proc workload.Process, err error) error {
	reason := changeReason(err)
	h.log.Info("no identity issued", "pid", proc.PID, "uid", proc.UID, "exe", proc.ExePath(),
		"reason", reason, "error", err)
	return status.Error(codes.PermissionDenied, "no identity issued: "+reason)
}

// recheckStream confirms, before a push that follows a wait, that the
// caller is still the process that was attested. If not, the stream ends
// with Unavailable (the client reconnects, and whoever connects then is
// attested afresh) and an audit line; nothing is sent.
func (h *handler) recheckStream(log hclog.Logger, proc workload.Process) error {
	err := proc.Recheck()
	if err == nil {
		return nil
	}
	return h.endStream(log, changeReason(err), err)
}

// endStream logs why a stream ends because of its caller and returns the
// Unavailable it ends with.
func (h *handler) endStream(log hclog.Logger, reason string, err error) error {
	if reason == "" {
		// /proc could not be read while the process lives: still no
		// proof that it is who was attested.
		reason = "the caller could not be re-checked"
	}
	log.Info("ended X.509-SVID stream", "reason", reason, "error", err)
	return status.Error(codes.Unavailable, reason)
}

// recheckCall confirms, before a one-shot answer that took time (a JWT
// mint may wait on the signer), that the caller is still the process that
// was attested; if not, it is refused as attest would refuse it.
func (h *handler) recheckCall(proc workload.Process) error {
	if err := proc.Recheck(); err != nil {
		// A /proc read that fails while the process lives is no proof
		// either: refused like an exit.
		return h.refuseCaller(proc, err, "caller exited during attestation")
	}
	return nil
}

// waitPinned is wait, plus the end of the stream when the caller exits,
// and a return after d when d > 0 (a caller waiting for a pending SVID).
// An exit is looked at first, so that a change that is also ready cannot
// win the race and lead to a push.
func (h *handler) waitPinned(ctx context.Context, changed, exited <-chan struct{}, log hclog.Logger, d time.Duration) error {
	var timeout <-chan time.Time
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-exited:
	default:
		select {
		case <-exited:
		case <-changed:
			// A client that does not read holds the next push until the
			// last one has left, so rotations coalesce (sendtrack.go).
			return waitSent(ctx, h.stopping)
		case <-timeout:
			return nil
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-h.stopping:
			return status.Error(codes.Unavailable, "agent is shutting down")
		}
	}
	// The ordinary end of a client: its connection closes with it.
	t := time.NewTimer(exitGrace)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-t.C:
		return h.endStream(log, "the caller exited", workload.ErrCallerExited)
	}
}

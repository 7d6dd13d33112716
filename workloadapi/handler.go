package workloadapi

import (
	"context"
	"errors"
	"strings"
	"time"
	"weak"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
)

// Attestor turns a caller into selectors. *attestor.Workload is one.
type Attestor interface {
	Attest(ctx context.Context, p attestor.Process) ([]string, error)
}

// Source is what the agent can serve right now. Each method returns the
// current response and a channel that is closed when that response may have
// changed; a nil channel means it never will. A Source builds each response
// once and never mutates it afterwards: the server shares it between
// streams and compares pointers to skip resending an unchanged one.
type Source interface {
	// X509SVIDResponse returns the SVIDs a caller with these selectors is
	// entitled to. Nil or empty means it is entitled to nothing.
	X509SVIDResponse(selectors []string) (*workload.X509SVIDResponse, <-chan struct{})
	// X509BundlesResponse returns the agent's own trust bundle; nil or
	// empty means the agent has none yet. Its channel closes on every
	// change of the Source (the health service relies on it).
	X509BundlesResponse() (*workload.X509BundlesResponse, <-chan struct{})
	// X509BundlesFor returns the trust bundles for a caller with these
	// selectors: the own one, and those of the foreign trust domains its
	// entries federate with (SPIFFE federation). Nil or empty means the
	// agent has none yet.
	X509BundlesFor(selectors []string) (*workload.X509BundlesResponse, <-chan struct{})
}

// ErrNotEntitled is what a JWTSource returns when the caller may not have
// what it asked for: no entry matches its selectors, or the SPIFFE ID it
// named is not among those that do. The server answers PermissionDenied.
var ErrNotEntitled = errors.New("no identity issued")

// ErrActionRefused is what a JWTSource returns when the caller asked for
// an action identity ("<entry ID>/action/<name>") of one of its entries
// and that entry does not allow it (no actions, another name, not exactly
// one audience). The server answers PermissionDenied with the reason.
var ErrActionRefused = errors.New("action identity refused")

// JWTSource mints JWT-SVIDs for attested callers and publishes the JWT
// bundles. The agent implements it next to Source.
type JWTSource interface {
	// JWTSVIDs returns one JWT-SVID for audience per entry that a caller
	// with these selectors is entitled to, in the same stable order as
	// X509SVIDResponse, or only the one for spiffeID when it is not empty.
	// It returns ErrNotEntitled (wrapped) when there is nothing to give;
	// any other error means the signer could not be reached in time.
	JWTSVIDs(ctx context.Context, selectors []string, spiffeID string, audience []string) ([]*workload.JWTSVID, error)
	// JWTBundlesResponse returns the JWT bundles (a JWKS per trust domain)
	// for a caller with these selectors, the own one and those of the
	// domains its entries federate with, and a channel closed when they
	// may have changed; like Source, the response is built once and
	// shared.
	JWTBundlesResponse(selectors []string) (*workload.JWTBundlesResponse, <-chan struct{})
	// JWTBundles returns the JWT bundles ValidateJWTSVID checks tokens
	// against for a caller with these selectors, as JWTBundlesResponse;
	// nil selectors give the own trust domain's alone.
	JWTBundles(selectors []string) *jwtbundle.Set
}

// securityHeader is the metadata key every Workload API call must carry
// with the value "true", so that a browser or SSRF-driven request, which
// cannot set it, is refused.
const securityHeader = "workload.spiffe.io"

// handler serves the SPIFFE Workload API. It picks every gRPC status code
// the API returns; the JWT methods are in jwt.go.
type handler struct {
	workload.UnimplementedSpiffeWorkloadAPIServer

	attestor Attestor
	source   Source
	jwt      JWTSource // nil: the JWT methods are Unimplemented
	tokens   *TokenGuard
	log      hclog.Logger
	observer Observer
	warn     *warnLimiter // per-uid rate limit on warnings (limits.go)
	// stopping ends open streams when the server shuts down, so that a
	// graceful stop does not wait on watchers that would never leave.
	stopping <-chan struct{}
	// pendingWait is Config.PendingWait, defaulted.
	pendingWait time.Duration
}

// defaultPendingWait is Config.PendingWait's default: a policy edit is
// signed in well under a second, and a caller should not wait long on a
// signer that is away.
const defaultPendingWait = 3 * time.Second

// pendingSource is a Source that can tell a caller entitled to an SVID it
// does not hold right now from one entitled to nothing. The agent's cache
// is one.
type pendingSource interface {
	// Pending reports whether a caller with these selectors matches an
	// entry whose SVID for the current revision is not held.
	Pending(selectors []string) bool
}

func pending(src Source, selectors []string) bool {
	p, ok := src.(pendingSource)
	return ok && p.Pending(selectors)
}

// FetchX509SVID streams the caller's X.509-SVIDs: now, and again each time
// the Source says they changed.
func (h *handler) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	ctx := stream.Context()
	proc, selectors, err := h.attest(ctx)
	if err != nil {
		return err
	}
	// The audit keys (README "Audit log"): who called, as this attestation
	// saw them.
	log := h.log.With("pid", proc.PID, "uid", proc.UID, "exe", exePath(selectors))
	exited := callerExit(ctx)

	// The last response sent, held weakly: all a stream needs of it is to
	// know it again, and holding it would keep a replaced SVID's private
	// key in memory for as long as the stream stays idle.
	var last weak.Pointer[workload.X509SVIDResponse]
	sent := false
	fresh := true // attested just now; false once the loop has waited
	var pendingSince time.Time
	for {
		resp, changed := h.source.X509SVIDResponse(selectors)
		if len(resp.GetSvids()) == 0 {
			if pending(h.source, selectors) {
				// Entitled, but the SVID of the entry's current revision
				// is not held: it is being signed (a policy edit) or it
				// lapsed while the signer was away. Wait a little for it;
				// then Unavailable, which clients retry, never an old SVID.
				if pendingSince.IsZero() {
					pendingSince = time.Now()
				}
				left := h.pendingWait - time.Since(pendingSince)
				if left <= 0 {
					log.Info("no identity issued", "selectors", selectors, "reason", "the caller's SVID is not signed yet")
					return status.Error(codes.Unavailable, "identity not available yet: its X.509-SVID is being signed; retry")
				}
				if err := h.waitPinned(ctx, changed, exited, log, left); err != nil {
					return err
				}
				fresh = false
				continue
			}
			reason := "no entry matches the caller's selectors"
			if sent {
				reason = "the caller's entries were removed"
			}
			log.Info("no identity issued", "selectors", selectors, "reason", reason)
			return status.Error(codes.PermissionDenied, "no identity issued")
		}
		pendingSince = time.Time{}
		if cur := weak.Make(resp); cur != last {
			// Nothing goes to a process that exec'd, changed uid or
			// exited since it was attested (pinned.go).
			if !fresh {
				if err := h.recheckStream(log, proc); err != nil {
					return err
				}
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
			// Info once per stream, Debug for each rotation push: a
			// rotation reaching 1,000 streams must not cost 1,000
			// certificate parses and Info lines.
			switch {
			case !sent:
				ids, serials := auditFacts(resp)
				log.Info("served X.509-SVIDs", "selectors", selectors, "spiffe_ids", ids, "serials", serials)
			case log.IsDebug():
				ids, serials := auditFacts(resp)
				log.Debug("pushed rotated X.509-SVIDs", "spiffe_ids", ids, "serials", serials)
			}
			last, sent = cur, true
		}
		resp = nil
		if err := h.waitPinned(ctx, changed, exited, log, 0); err != nil {
			return err
		}
		fresh = false
	}
}

// FetchX509Bundles streams the trust bundles: the own trust domain's, and
// those of the domains the caller's entries federate with. Bundles are
// public, but which foreign domains a workload trusts is policy, so the
// caller is attested (as SPIRE does); one that matches no entry gets the
// own bundle alone.
func (h *handler) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	_, selectors, err := h.attest(stream.Context())
	if err != nil {
		return err
	}
	return streamBundles(h, stream, func() (*workload.X509BundlesResponse, <-chan struct{}) {
		return h.source.X509BundlesFor(selectors)
	}, "no trust bundle yet")
}

// bundlesResponse is what the bundle streams send: a pointer to a message
// holding a map per trust domain.
type bundlesResponse[R any] interface {
	*R
	GetBundles() map[string][]byte
}

// streamBundles sends the current bundles at once and again on every
// change until the caller leaves. No bundle yet is Unavailable, not an
// empty answer, so the client retries.
func streamBundles[R any, P bundlesResponse[R]](h *handler, stream grpc.ServerStreamingServer[R], current func() (P, <-chan struct{}), none string) error {
	ctx := stream.Context()
	var last P
	for {
		resp, changed := current()
		if len(resp.GetBundles()) == 0 {
			return status.Error(codes.Unavailable, none)
		}
		if resp != last {
			if err := stream.Send(resp); err != nil {
				return err
			}
			last = resp
		}
		if err := h.wait(ctx, changed); err != nil {
			return err
		}
	}
}

// attest finds who is calling and what selectors they have. A caller that
// cannot be attested gets Unavailable (clients retry) with the reason, and
// a log line with its PID; one that exec'd or changed uid or gid since it
// connected gets PermissionDenied and an audit line.
func (h *handler) attest(ctx context.Context) (attestor.Process, []string, error) {
	proc, err := callerFromContext(ctx)
	var selectors []string
	if err == nil {
		start := time.Now()
		selectors, err = h.attestor.Attest(ctx, proc)
		if h.observer != nil {
			h.observer.CallerAttested(time.Since(start), err == nil)
		}
	}
	if err == nil {
		return proc, selectors, nil
	}
	if errors.Is(err, errNoPeerCred) {
		// peerCredentials refuses such connections; reaching here is a bug.
		h.log.Error("call without peer credentials")
		return proc, nil, status.Error(codes.Unavailable, "could not attest caller")
	}
	return proc, nil, h.refuseCaller(proc, err, "could not attest caller")
}

// refuseCaller answers a call whose caller failed attestation or its
// re-check: PermissionDenied with an audit line when it is no longer the
// process that connected (pinned.go), else Unavailable (clients retry),
// with a warning rate-limited per uid. other is the message for a failure
// that is neither an exit nor a change.
func (h *handler) refuseCaller(proc attestor.Process, err error, other string) error {
	msg := other
	switch {
	case errors.Is(err, attestor.ErrCallerExited):
		msg = "caller exited during attestation"
	case errors.Is(err, attestor.ErrCallerExeced), errors.Is(err, attestor.ErrCallerChanged):
		return h.refuseChanged(proc, err)
	}
	h.warn.Warn(proc.UID, msg, "pid", proc.PID, "uid", proc.UID, "error", err)
	return status.Error(codes.Unavailable, msg)
}

// wait blocks until changed is closed (nil), the call ends, or the server
// stops (both errors for the stream to return).
func (h *handler) wait(ctx context.Context, changed <-chan struct{}) error {
	select {
	case <-changed:
		// A client that does not read holds the next push until the last
		// one has left, so rotations coalesce into the latest state.
		return waitSent(ctx, h.stopping)
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-h.stopping:
		// Unavailable makes clients reconnect, to this agent's successor.
		return status.Error(codes.Unavailable, "agent is shutting down")
	}
}

// checkHeader refuses a call without the security header.
func checkHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(securityHeader); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

// headerExempt says whether a method may be called without the security
// header: server reflection and the gRPC health service, whose clients
// (grpcurl, health probes) cannot be told to send it and which reveal
// nothing but the public service definition and whether the agent serves;
// and Envoy's SDS, as on SPIRE's socket, because Envoy cannot be told to
// send it either; SDS still attests its caller and answers only with what
// that caller is entitled to. Every other method, including any
// registered later, needs the header.
func headerExempt(fullMethod string) bool {
	return isSDSMethod(fullMethod) ||
		strings.HasPrefix(fullMethod, "/"+reflectionv1.ServerReflection_ServiceDesc.ServiceName+"/") ||
		strings.HasPrefix(fullMethod, "/"+reflectionv1alpha.ServerReflection_ServiceDesc.ServiceName+"/") ||
		strings.HasPrefix(fullMethod, "/"+healthpb.Health_ServiceDesc.ServiceName+"/")
}

// headerUnary applies checkHeader before any unary handler runs.
func headerUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	if !headerExempt(info.FullMethod) {
		if err := checkHeader(ctx); err != nil {
			return nil, err
		}
	}
	return next(ctx, req)
}

// headerStream applies checkHeader before any streaming handler runs.
func headerStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
	if !headerExempt(info.FullMethod) {
		if err := checkHeader(ss.Context()); err != nil {
			return err
		}
	}
	return next(srv, ss)
}

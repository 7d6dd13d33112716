package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// errNoJWT answers the JWT methods on an agent configured without a
// JWTSource.
var errNoJWT = status.Error(codes.Unimplemented, "JWT-SVIDs are not served by this agent")

// FetchJWTSVID mints JWT-SVIDs for the attested caller: one per identity it
// is entitled to, or only the one it names in spiffe_id. The audit line
// names the caller, the SPIFFE IDs and the audience; never a token.
func (h *handler) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if h.jwt == nil {
		return nil, errNoJWT
	}
	audience := req.GetAudience()
	if len(audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience is required")
	}
	if len(audience) > maxAudiences {
		return nil, status.Errorf(codes.InvalidArgument, "too many audience values: %d (limit %d)", len(audience), maxAudiences)
	}
	for i, a := range audience {
		if err := checkAudience(a); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "audience %d: %v", i, err)
		}
	}
	var want string
	if raw := req.GetSpiffeId(); raw != "" {
		id, err := spiffeid.FromString(raw)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "spiffe_id %.200q is not a SPIFFE ID: %v", raw, err)
		}
		want = id.String()
	}
	proc, selectors, err := h.attest(ctx)
	if err != nil {
		return nil, err
	}
	log := h.log.With("pid", proc.PID, "uid", proc.UID, "exe", exePath(selectors), "audience", audience)
	if want != "" {
		log = log.With("requested_spiffe_id", want)
	}

	svids, err := h.jwt.JWTSVIDs(ctx, selectors, want, audience)
	switch {
	case errors.Is(err, ErrActionRefused):
		log.Info("no identity issued", "selectors", selectors, "reason", err.Error())
		return nil, status.Error(codes.PermissionDenied, err.Error())
	case errors.Is(err, ErrNotEntitled) || (err == nil && len(svids) == 0):
		reason := "no entry matches the caller's selectors"
		if want != "" {
			reason = "the requested SPIFFE ID is not among the caller's entries"
		}
		log.Info("no identity issued", "selectors", selectors, "reason", reason)
		if want != "" {
			return nil, status.Errorf(codes.PermissionDenied, "no identity issued for %s", want)
		}
		return nil, status.Error(codes.PermissionDenied, "no identity issued")
	case err != nil && ctx.Err() != nil:
		return nil, status.FromContextError(ctx.Err()).Err()
	case err != nil:
		log.Warn("could not mint JWT-SVIDs", "error", err)
		return nil, status.Errorf(codes.Unavailable, "could not mint JWT-SVID: %v", err)
	}
	// Minting may have waited on the signer: the tokens go only to the
	// process that was attested, if it still is that process.
	if err := h.recheckCall(proc); err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(svids))
	for _, s := range svids {
		ids = append(ids, s.GetSpiffeId())
		if a, ok := actionClaimsOf(s.GetSvid()); ok {
			// One line per action token: what an AI agent or a job did,
			// attributable to its process; never the token itself.
			log.Info("served action JWT-SVID", "parent_id", a.Act.Sub, "action", a.action(),
				"jti", a.ID, "exp", a.exp())
		}
	}
	log.Info("served JWT-SVIDs", "selectors", selectors, "spiffe_ids", ids)
	return &workload.JWTSVIDResponse{Svids: svids}, nil
}

// FetchJWTBundles streams the JWT bundles: now, and again each time they
// change. Like FetchX509Bundles, the caller is attested so that it gets
// the bundles of the domains its entries federate with.
func (h *handler) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	if h.jwt == nil {
		return errNoJWT
	}
	_, selectors, err := h.attest(stream.Context())
	if err != nil {
		return err
	}
	return streamBundles(h, stream, func() (*workload.JWTBundlesResponse, <-chan struct{}) {
		return h.jwt.JWTBundlesResponse(selectors)
	}, "no JWT bundle yet")
}

// ValidateJWTSVID checks a JWT-SVID against the JWT bundles (see
// validateJWTSVID for what is checked) and returns its SPIFFE ID and claims.
// Every refusal is InvalidArgument with the reason. The caller needs no
// identity of its own for a token of the agent's own trust domain:
// validating uses public keys only, as the spec intends for relying
// parties that hold no SVID. A token of another trust domain is checked
// against that domain's keys only when the caller's entries federate with
// it, so only then is the caller attested (callerJWTBundles). Its PID is
// logged at Debug, as validation is a hot path.
func (h *handler) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if h.jwt == nil {
		return nil, errNoJWT
	}
	if req.GetAudience() == "" {
		return nil, status.Error(codes.InvalidArgument, "audience is required")
	}
	if err := checkAudience(req.GetAudience()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "audience: %v", err)
	}
	if req.GetSvid() == "" {
		return nil, status.Error(codes.InvalidArgument, "svid is required")
	}
	proc, _ := callerFromContext(ctx)
	log := h.log.With("pid", proc.PID, "uid", proc.UID, "audience", req.GetAudience())
	bundles := &callerJWTBundles{h: h, ctx: ctx}
	id, claims, err := validateJWTSVID(req.GetSvid(), req.GetAudience(), bundles.get, time.Now())
	if err != nil {
		log.Debug("refused JWT-SVID", "reason", err.Error())
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	st, err := structpb.NewStruct(claims)
	if err != nil {
		log.Debug("refused JWT-SVID", "spiffe_id", id.String(), "reason", err.Error())
		return nil, status.Errorf(codes.InvalidArgument, "claims cannot be returned: %v", err)
	}
	if err := h.admitToken(ctx, id, claims, req.GetAudience()); err != nil {
		return nil, err
	}
	log.Debug("validated JWT-SVID", "spiffe_id", id.String())
	return &workload.ValidateJWTSVIDResponse{SpiffeId: id.String(), Claims: st}, nil
}

// Bounds on a JWT-SVID request's audience: far above any real use (a
// token names one or a few services), low enough that one call cannot make
// the agent and the signer carry megabytes.
const (
	maxAudiences     = 32
	maxAudienceBytes = 1024
)

// checkAudience refuses an audience value no relying party could mean: an
// empty one, an oversized one, and one holding control characters (NUL
// included), which no printable audience has and which once made two
// different audience sets share a cache key.
func checkAudience(a string) error {
	switch {
	case a == "":
		return errors.New("empty audience value")
	case len(a) > maxAudienceBytes:
		return fmt.Errorf("audience value of %d bytes (limit %d)", len(a), maxAudienceBytes)
	case !utf8.ValidString(a):
		return errors.New("audience value is not valid UTF-8")
	}
	for i, r := range a {
		if unicode.IsControl(r) {
			return fmt.Errorf("audience value holds control character %U at byte %d", r, i)
		}
	}
	return nil
}

// callerJWTBundles finds the JWT bundle of a token's trust domain for one
// ValidateJWTSVID call: the agent's own for any caller, with no
// attestation (the hot path), and a federated domain's only for a caller
// whose entries federate with it, attested on first need.
type callerJWTBundles struct {
	h   *handler
	ctx context.Context
}

func (c *callerJWTBundles) get(td spiffeid.TrustDomain) (*jwtbundle.Bundle, string) {
	if b, ok := c.h.jwt.JWTBundles(nil).Get(td); ok {
		return b, ""
	}
	_, selectors, err := c.h.attest(c.ctx)
	if err != nil {
		return nil, "a foreign domain's tokens are validated only for a caller whose entries federate with it, and the caller could not be attested"
	}
	if b, ok := c.h.jwt.JWTBundles(selectors).Get(td); ok {
		return b, ""
	}
	return nil, "no entry of the caller federates with it"
}

package signer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Bounds of one MintJWTSVIDs call, so that one agent cannot make the
// signer hold its lock or its memory for long.
const (
	maxJWTRequests   = 1000
	maxAudiences     = 32
	maxAudienceBytes = 1024
)

// ErrUnknownEntry is returned for a request naming an entry the policy
// does not have (any more).
var ErrUnknownEntry = errors.New("no such entry in the policy")

// ErrBadAudience is returned for a JWT-SVID request whose audience list is
// too long or holds an empty, oversized, non-UTF-8 or control-character
// value.
var ErrBadAudience = errors.New("bad audience")

func (a *api) MintJWTSVIDs(ctx context.Context, req *signerpb.MintJWTSVIDsRequest) (*signerpb.MintJWTSVIDsResponse, error) {
	s := a.s
	id, err := s.authenticate(ctx, "MintJWTSVIDs")
	if err != nil {
		return nil, err
	}
	if n := len(req.GetRequests()); n > maxJWTRequests {
		return nil, status.Errorf(codes.InvalidArgument, "too many JWT-SVID requests in one call: %d (limit %d)", n, maxJWTRequests)
	}
	// A malformed audience refuses the whole call before anything is
	// minted or charged: the agent sends one audience list per call.
	for i, r := range req.GetRequests() {
		if err := checkAudience(r.GetAudience()); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "request %d (entry %q): %v", i+1, r.GetEntryId(), err)
		}
	}
	now := time.Now()
	if n := len(req.GetRequests()); n > 0 && !s.mints.take(id, n, now) {
		s.metrics.limitRefusals.WithLabelValues(limitJWTMintRate).Inc()
		s.warnLimited("jwt-svids refused: limit reached", id.String(), "agent", id.String(), "limit", limitJWTMintRate, "requests", n)
		return nil, status.Errorf(codes.ResourceExhausted, "%v: %d per second, burst %d", ErrMintRate,
			s.cfg.Limits.JWTMintsPerSecond, s.cfg.Limits.JWTMintBurst)
	}
	resp := &signerpb.MintJWTSVIDsResponse{Svids: make([]*signerpb.MintedJWTSVID, 0, len(req.GetRequests()))}
	for _, r := range req.GetRequests() {
		out := &signerpb.MintedJWTSVID{EntryId: r.GetEntryId()}
		m, err := s.mintOne(id, r, now)
		if err != nil {
			out.Error = err.Error()
			s.log.Warn("jwt-svid refused", "agent", id.String(), "entry", r.GetEntryId(), "reason", err.Error())
		} else {
			out.Token = m.token
			// The audit line: never the token itself.
			s.log.Info("jwt-svid minted", "agent", id.String(), "entry", m.entry, "spiffe_id", m.id.String(),
				"audience", r.GetAudience(), "kid", m.kid, "exp", m.exp.UTC().Format(time.RFC3339))
		}
		resp.Svids = append(resp.Svids, out)
	}
	return resp, nil
}

// minted is one JWT-SVID and the facts the audit line names.
type minted struct {
	token, kid, entry string
	id                spiffeid.ID
	exp               time.Time
}

// mintOne mints the token of one request, if the entry is one agent's
// node may serve. The subject is the entry's SPIFFE ID and the lifetime
// the entry's jwt_ttl, capped at jwt_max_ttl.
func (s *Signer) mintOne(agent spiffeid.ID, r *signerpb.JWTSVIDRequest, now time.Time) (*minted, error) {
	if err := checkAudience(r.GetAudience()); err != nil {
		return nil, fmt.Errorf("entry %q: %w", r.GetEntryId(), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, ok := s.agents[agent]
	if !ok {
		return nil, fmt.Errorf("agent is not attested with this signer")
	}
	w, err := s.authorizedLocked(rec, r.GetEntryId())
	if err != nil {
		return nil, err
	}
	tok, kid, exp, err := s.auth.mintJWT(w.SPIFFEID, r.GetAudience(), min(w.JWTTTL, s.cfg.JWTMaxTTL), now)
	if err != nil {
		return nil, fmt.Errorf("entry %q: %w", w.Name, err)
	}
	return &minted{token: tok, kid: kid, entry: w.Name, id: w.SPIFFEID, exp: exp}, nil
}

// authorizedLocked returns the entry named entryID if rec's node may
// serve it, telling an entry that does not exist from one of another node.
func (s *Signer) authorizedLocked(rec *agentRecord, entryID string) (policy.Workload, error) {
	allowed := s.pol.WorkloadsForNodes(rec.names)
	if i := slices.IndexFunc(allowed, func(w policy.Workload) bool { return w.Name == entryID }); i >= 0 {
		return allowed[i], nil
	}
	if slices.ContainsFunc(s.pol.Workloads, func(w policy.Workload) bool { return w.Name == entryID }) {
		return policy.Workload{}, fmt.Errorf("entry %q: %w", entryID, ErrEntryNotAuthorized)
	}
	return policy.Workload{}, fmt.Errorf("entry %q: %w", entryID, ErrUnknownEntry)
}

// checkAudience bounds a request's audience list. Audience values are
// opaque to the signer beyond their count and size, except that each must
// be printable UTF-8: a NUL or other control character lets two different
// audience lists look alike to a cache, a log or a relying party, and
// invalid UTF-8 would come out of the token's JSON as something else.
func checkAudience(aud []string) error {
	switch {
	case len(aud) == 0:
		return ErrNoAudience
	case len(aud) > maxAudiences:
		return fmt.Errorf("%w: %d values (limit %d)", ErrBadAudience, len(aud), maxAudiences)
	}
	for i, a := range aud {
		switch {
		case a == "":
			return fmt.Errorf("%w: value %d is empty", ErrBadAudience, i+1)
		case len(a) > maxAudienceBytes:
			return fmt.Errorf("%w: value %d is %d bytes (limit %d)", ErrBadAudience, i+1, len(a), maxAudienceBytes)
		case !utf8.ValidString(a):
			return fmt.Errorf("%w: value %d is not valid UTF-8", ErrBadAudience, i+1)
		}
		if j := strings.IndexFunc(a, unicode.IsControl); j >= 0 {
			r, _ := utf8.DecodeRuneInString(a[j:])
			return fmt.Errorf("%w: value %d holds control character %U at byte %d", ErrBadAudience, i+1, r, j)
		}
	}
	return nil
}

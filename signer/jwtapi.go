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
		switch {
		case err != nil:
			out.Error = err.Error()
			s.log.Warn("jwt-svid refused", "agent", id.String(), "entry", r.GetEntryId(), "action", r.GetAction(), "reason", err.Error())
		case m.action != "":
			// The audit line of an action: never the token itself.
			s.log.Info("action jwt-svid minted", "agent", id.String(), "entry", m.entry, "action", m.action,
				"spiffe_id", m.id.String(), "audience", r.GetAudience()[0], "jti", m.jti, "exp", m.exp.UTC().Format(time.RFC3339))
		default:
			s.log.Info("jwt-svid minted", "agent", id.String(), "entry", m.entry, "spiffe_id", m.id.String(),
				"audience", r.GetAudience(), "kid", m.kid, "jti", m.jti, "exp", m.exp.UTC().Format(time.RFC3339))
		}
		if err == nil {
			out.Token, out.Jti, out.ExpiresAt = m.token, m.jti, m.exp.Unix()
		}
		resp.Svids = append(resp.Svids, out)
	}
	return resp, nil
}

// ErrActionRefused is the kind of every refused action identity
// request; the message says why, precisely, since it reaches the
// workload as the PermissionDenied reason.
var ErrActionRefused = errors.New("action identity refused")

// actionRefusal is a refused action request: its message is the exact
// reason, its kind ErrActionRefused.
type actionRefusal string

func (r actionRefusal) Error() string { return string(r) }
func (r actionRefusal) Unwrap() error { return ErrActionRefused }

// minted is one JWT-SVID and the facts the audit line names.
type minted struct {
	signedJWT
	entry, action string
	id            spiffeid.ID
}

// mintOne mints the token of one request, if the entry is one agent's
// node may serve. The subject is the entry's SPIFFE ID and the lifetime
// the entry's jwt_ttl, capped at jwt_max_ttl; for an action, see
// actionClaims.
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
	c := jwtClaims{sub: w.SPIFFEID, audience: r.GetAudience(), ttl: min(w.JWTTTL, s.cfg.JWTMaxTTL)}
	if r.GetAction() != "" {
		if c, err = actionClaims(w, r.GetAction(), r.GetAudience(), s.cfg.JWTMaxTTL); err != nil {
			return nil, err
		}
	}
	m, err := s.auth.mintJWT(c, now)
	if err != nil {
		return nil, fmt.Errorf("entry %q: %w", w.Name, err)
	}
	return &minted{signedJWT: m, entry: w.Name, action: r.GetAction(), id: c.sub}, nil
}

// actionClaims are the claims of action for entry w: sub is the action
// ID <spiffe_id>/action/<action>, act names the entry's own ID (RFC
// 8693), the lifetime is the actions block's ttl (capped at maxTTL), and
// the audience is exactly one: a token for one step of one tool.
func actionClaims(w policy.Workload, action string, audience []string, maxTTL time.Duration) (jwtClaims, error) {
	if err := policy.CheckActionName(action, false); err != nil {
		if len(action) > 64 {
			action = action[:64] + "..."
		}
		return jwtClaims{}, actionRefusal(fmt.Sprintf("bad action name %q: %v", action, err))
	}
	switch {
	case w.Actions == nil:
		return jwtClaims{}, actionRefusal(fmt.Sprintf("entry %s allows no actions", w.Name))
	case !w.Actions.Allows(action):
		return jwtClaims{}, actionRefusal(fmt.Sprintf("action %q not allowed for entry %s", action, w.Name))
	case len(audience) != 1:
		return jwtClaims{}, actionRefusal("an action token takes exactly one audience")
	}
	id, err := w.ActionID(action)
	if err != nil {
		return jwtClaims{}, actionRefusal(fmt.Sprintf("action %q for entry %s: %v", action, w.Name, err))
	}
	return jwtClaims{sub: id, audience: audience, ttl: min(w.Actions.TTL, maxTTL), act: w.SPIFFEID}, nil
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

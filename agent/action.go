package agent

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// actionPolicy is an entry's policy actions block: the action identities
// "<entry ID>/action/<name>" a caller matching the entry may ask for.
type actionPolicy struct {
	TTL   time.Duration
	Names []string // "*" matches exactly one path segment
}

// actionsFrom converts an entry's actions block; nil when it allows none.
func actionsFrom(e *signerpb.Entry) *actionPolicy {
	a := e.GetActions()
	if a == nil || a.GetTtlSeconds() <= 0 || len(a.GetNames()) == 0 {
		return nil
	}
	return &actionPolicy{TTL: time.Duration(a.GetTtlSeconds()) * time.Second, Names: a.GetNames()}
}

// actionSeparator splits an action ID into its parent, the entry's own
// SPIFFE ID, and the action name.
const actionSeparator = "/action/"

// allows reports whether the policy allows the action name: some pattern
// has as many "/"-separated segments, each equal or "*". The signer
// checks the same again when minting; the agent refuses early, with the
// same reasons, so that a refused request never reaches the signer.
func (p *actionPolicy) allows(name string) bool {
	segs := strings.Split(name, "/")
	for _, pat := range p.Names {
		psegs := strings.Split(pat, "/")
		if len(psegs) != len(segs) {
			continue
		}
		ok := true
		for i, s := range psegs {
			if s != "*" && s != segs[i] {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// actionEntry finds, among the caller's entries, the one whose action
// identity id is, and the action name. The longest parent wins, so that
// an entry whose own ID holds "/action/" is still found. ok is false when
// id is no action ID of any of them.
func (j *jwtSource) actionEntry(selectors []string, id spiffeid.ID) (e *entry, name string, ok bool) {
	for _, c := range j.cache.jwtEntries(selectors, spiffeid.ID{}) {
		if c.SPIFFEID.TrustDomain() != id.TrustDomain() {
			continue
		}
		rest, found := strings.CutPrefix(id.Path(), c.SPIFFEID.Path()+actionSeparator)
		if found && (e == nil || len(c.SPIFFEID.Path()) > len(e.SPIFFEID.Path())) {
			e, name = c, rest
		}
	}
	return e, name, e != nil
}

// actionSVID mints the action identity id of entry e for the caller: for
// this request only, through the signer, on the caller's context. It is
// never cached nor shared with another caller or request, which is what
// makes an action token single-issue; the Workload API checks single use
// on validation.
func (j *jwtSource) actionSVID(ctx context.Context, e *entry, id spiffeid.ID, name string, audience []string) (*workload.JWTSVID, error) {
	switch {
	case e.Actions == nil:
		return nil, fmt.Errorf("%w: entry %s allows no action identities (no actions block in its policy)", workloadapi.ErrActionRefused, e.SPIFFEID)
	case len(audience) != 1:
		return nil, fmt.Errorf("%w: an action identity takes exactly one audience, not %d", workloadapi.ErrActionRefused, len(audience))
	case !e.Actions.allows(name):
		return nil, fmt.Errorf("%w: action %q is not among those entry %s allows (%s)", workloadapi.ErrActionRefused, name, e.SPIFFEID, strings.Join(e.Actions.Names, ", "))
	}
	j.mu.Lock()
	stopped := j.stopped
	j.mu.Unlock()
	if stopped {
		return nil, errNotRunning
	}
	resp, err := j.mint(ctx, []*signerpb.JWTSVIDRequest{{EntryId: e.ID, Audience: audience, Action: name}})
	if err != nil {
		return nil, fmt.Errorf("mint action JWT-SVID %s: %w", id, err)
	}
	if len(resp) != 1 {
		return nil, fmt.Errorf("mint action JWT-SVID %s: signer answered %d JWT-SVIDs, want 1", id, len(resp))
	}
	if err := checkActionToken(resp[0], e, id); err != nil {
		return nil, err
	}
	return &workload.JWTSVID{SpiffeId: id.String(), Svid: resp[0].GetToken(), Hint: e.Hint}, nil
}

// checkActionToken checks the signer's answer for an action identity: the
// action ID as subject, the entry's ID in act, a jti and a lifetime. A
// refusal by the signer (its policy re-check) is passed on as one.
func checkActionToken(r *signerpb.MintedJWTSVID, e *entry, id spiffeid.ID) error {
	if r.GetError() != "" {
		return fmt.Errorf("%w: refused by signer: %s", workloadapi.ErrActionRefused, r.GetError())
	}
	if r.GetEntryId() != e.ID {
		return fmt.Errorf("action %s: signer answered for entry %q", id, r.GetEntryId())
	}
	tok, err := jwt.ParseSigned(r.GetToken(), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return fmt.Errorf("action %s: parse JWT-SVID: %w", id, err)
	}
	var c struct {
		jwt.Claims
		Act struct {
			Sub string `json:"sub"`
		} `json:"act"`
	}
	if err := tok.UnsafeClaimsWithoutVerification(&c); err != nil {
		return fmt.Errorf("action %s: read JWT-SVID claims: %w", id, err)
	}
	if c.Subject != id.String() || c.Act.Sub != e.SPIFFEID.String() || c.ID == "" ||
		c.Expiry == nil || c.IssuedAt == nil || !c.Expiry.Time().After(c.IssuedAt.Time()) {
		return fmt.Errorf("action %s: JWT-SVID from signer lacks the action subject, the act claim, a jti or a lifetime", id)
	}
	return nil
}

// revocationsFrom converts the token revocations of a sync message,
// leaving out those expired at now (past expires_at and the validation
// leeway) and those that name neither a
// jti nor a SPIFFE ID with a time (with a warning: the signer validated
// them).
func revocationsFrom(in []*signerpb.TokenRevocation, now time.Time, log hclog.Logger) []workloadapi.Revocation {
	out := make([]workloadapi.Revocation, 0, len(in))
	for _, r := range in {
		exp := time.Unix(r.GetExpiresAt(), 0)
		if !now.Before(exp.Add(workloadapi.JWTLeeway)) {
			continue
		}
		rev := workloadapi.Revocation{JTI: r.GetJti(), Reason: r.GetReason(), ExpiresAt: exp}
		if rev.JTI == "" {
			id, err := spiffeid.FromString(r.GetSpiffeId())
			if err != nil || r.GetIssuedBefore() <= 0 {
				log.Warn("ignoring invalid token revocation from signer", "spiffe_id", r.GetSpiffeId(), "issued_before", r.GetIssuedBefore())
				continue
			}
			rev.SPIFFEID, rev.IssuedBefore = id, time.Unix(r.GetIssuedBefore(), 0)
		}
		out = append(out, rev)
	}
	return out
}

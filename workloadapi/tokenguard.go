package workloadapi

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Refusals of ValidateJWTSVID past the signature and claims: each is
// answered InvalidArgument with its message.
var (
	// ErrTokenUsed refuses an action token this agent has accepted once.
	ErrTokenUsed = errors.New("token already used")
	// ErrTokenRevoked refuses a token a revocation covers; the reason
	// follows it.
	ErrTokenRevoked = errors.New("token revoked")
	// ErrTooManyActionTokens refuses a new action token when the agent
	// already remembers DefaultMaxActionTokens unexpired ones: forgetting
	// one would let it be used twice, so the new one waits instead.
	ErrTooManyActionTokens = errors.New("too many action tokens in flight")
)

// DefaultMaxActionTokens bounds the action tokens (by jti) an agent
// remembers as used: about 100 bytes each, so 10 MB at most. Action
// tokens live minutes at most, so this is thousands of validations a
// second sustained, far above what one host's relying parties do.
const DefaultMaxActionTokens = 100_000

// sweepEvery is how often the used-token memory drops the expired ones
// when it is not full (when full, it sweeps before refusing).
const sweepEvery = time.Minute

// Revocation refuses JWT-SVIDs: one token by its jti, or every token of a
// SPIFFE ID issued before a time. By ExpiresAt every token it covers has
// expired; the guard keeps it JWTLeeway longer, as validation accepts a
// token that long after its exp.
type Revocation struct {
	JTI          string      // one token; or
	SPIFFEID     spiffeid.ID // every token whose sub is this ID and
	IssuedBefore time.Time   //   whose iat is before this
	Reason       string
	ExpiresAt    time.Time
}

// Covers reports whether r refuses the token with this jti, subject and
// iat. A token without iat is covered by a revocation of its subject: the
// revocation cannot prove it was issued after.
func (r *Revocation) Covers(jti string, sub spiffeid.ID, iat time.Time) bool {
	if r.JTI != "" {
		return jti == r.JTI
	}
	return !r.SPIFFEID.IsZero() && sub == r.SPIFFEID && (iat.IsZero() || iat.Before(r.IssuedBefore))
}

// TokenGuard is what ValidateJWTSVID checks after a token verified: the
// revocations in force, and which action tokens were already accepted
// (single use, per agent). Its methods are safe for concurrent use.
type TokenGuard struct {
	max int

	mu        sync.Mutex
	revs      []Revocation
	used      map[string]time.Time // action token jti: until when it is remembered
	nextSweep time.Time
}

// NewTokenGuard returns a guard remembering at most maxActionTokens used
// action tokens (DefaultMaxActionTokens when 0 or less).
func NewTokenGuard(maxActionTokens int) *TokenGuard {
	if maxActionTokens <= 0 {
		maxActionTokens = DefaultMaxActionTokens
	}
	return &TokenGuard{max: maxActionTokens, used: make(map[string]time.Time)}
}

// SetRevocations replaces the revocations in force at now (the signer
// sends all of them on every sync message). One the signer dropped
// because its ExpiresAt passed is kept for the rest of JWTLeeway.
func (g *TokenGuard) SetRevocations(revs []Revocation, now time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	next := append([]Revocation(nil), revs...)
	for _, old := range g.revs {
		if !now.Before(old.ExpiresAt) && now.Before(old.ExpiresAt.Add(JWTLeeway)) && !slices.Contains(next, old) {
			next = append(next, old)
		}
	}
	g.revs = next
}

// Revocations counts the revocations in force at now; expired ones are
// dropped.
func (g *TokenGuard) Revocations(now time.Time) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dropExpiredLocked(now)
	return len(g.revs)
}

// Revoked returns the revocation in force at now that covers the token
// with this jti, subject and iat, if any.
func (g *TokenGuard) Revoked(jti string, sub spiffeid.ID, iat, now time.Time) (Revocation, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dropExpiredLocked(now)
	for _, r := range g.revs {
		if r.Covers(jti, sub, iat) {
			return r, true
		}
	}
	return Revocation{}, false
}

// Used counts the action tokens remembered as used (tests, status).
func (g *TokenGuard) Used() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.used)
}

// dropExpiredLocked drops the revocations no token they cover can pass
// validation any more: past ExpiresAt plus JWTLeeway, since validation
// accepts a token up to JWTLeeway after its exp.
func (g *TokenGuard) dropExpiredLocked(now time.Time) {
	kept := g.revs[:0]
	for _, r := range g.revs {
		if now.Before(r.ExpiresAt.Add(JWTLeeway)) {
			kept = append(kept, r)
		}
	}
	clear(g.revs[len(kept):])
	g.revs = kept
}

// verifiedToken is what the guard reads of a token whose signature and
// claims verified.
type verifiedToken struct {
	sub      spiffeid.ID
	jti      string
	iat, exp time.Time // iat zero when absent
	actor    string    // the act claim's sub: set only on action tokens
	isAction bool      // the token has an act claim
}

// admit refuses a revoked token, and an action token seen before; it
// records an action token as used. An action token is remembered until
// its exp plus JWTLeeway, as long as validation would accept it.
func (g *TokenGuard) admit(t verifiedToken, now time.Time) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dropExpiredLocked(now)
	for _, r := range g.revs {
		if r.Covers(t.jti, t.sub, t.iat) {
			return fmt.Errorf("%w: %s", ErrTokenRevoked, r.Reason)
		}
	}
	if !t.isAction {
		return nil
	}
	if t.jti == "" {
		return errors.New("action token has no jti claim: it cannot be used once only")
	}
	if _, ok := g.used[t.jti]; ok {
		return ErrTokenUsed
	}
	if len(g.used) >= g.max || !now.Before(g.nextSweep) {
		maps.DeleteFunc(g.used, func(_ string, until time.Time) bool { return !now.Before(until) })
		g.nextSweep = now.Add(sweepEvery)
	}
	if len(g.used) >= g.max {
		return fmt.Errorf("%w (%d remembered until they expire)", ErrTooManyActionTokens, g.max)
	}
	g.used[t.jti] = t.exp.Add(JWTLeeway)
	return nil
}

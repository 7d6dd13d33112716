package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/lru"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// maxJWTTokens bounds the token cache. Past it the least recently
	// served token goes: a caller that still wants it gets a new one.
	maxJWTTokens = 10000
)

// errNoAudience is returned for a JWT-SVID request without audience. The
// Workload API refuses those before asking.
var errNoAudience = errors.New("a JWT-SVID needs at least one audience")

// jwtMinter asks the signer for JWT-SVIDs: one answer per request, in
// request order.
type jwtMinter func(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error)

// jwtSource implements workloadapi.JWTSource. Tokens are cached per
// (entry revision, audience set) and reused until half their lifetime, so
// a busy caller does not reach the signer on every call; a stale token
// that is still valid is served when the signer cannot be reached; an
// expired one never is. Its Run owns the goroutines that mint: they end
// before Run returns.
type jwtSource struct {
	cache *cache
	mint  jwtMinter
	now   func() time.Time
	log   hclog.Logger
	// guard holds the token revocations in force: a cached token one
	// covers is never served; nil in tests that have none.
	guard *workloadapi.TokenGuard

	mu       sync.Mutex
	tokens   *lru.Cache[tokenKey, *jwtToken] // least recently served goes first
	inflight map[tokenKey]*flight            // mints under way
	flyCtx   context.Context                 // the mints', ended by Run
	stopFly  context.CancelFunc
	stopped  bool           // Run returned: no more mints
	flights  sync.WaitGroup // fly goroutines under way
}

// tokenKey names a cached token: one entry revision, one audience set.
type tokenKey struct {
	entry entryKey
	aud   string // audienceKey of the normalized audience
}

// jwtToken is one cached JWT-SVID, with the times read from its claims.
type jwtToken struct {
	key      tokenKey
	token    string
	sub      spiffeid.ID
	jti      string // "" from a signer that names none
	iat, exp time.Time
}

// renewAt is half the token's lifetime: from then on it is minted anew.
func (t *jwtToken) renewAt() time.Time { return t.iat.Add(t.exp.Sub(t.iat) / 2) }

// flight is one token being minted; done is closed once tok or err is set.
type flight struct {
	done chan struct{}
	tok  *jwtToken
	err  error
}

var _ workloadapi.JWTSource = (*jwtSource)(nil)

// errNotRunning is returned for a JWT-SVID that would need a signer call
// after the agent stopped.
var errNotRunning = errors.New("agent is not running")

func newJWTSource(c *cache, mint jwtMinter, log hclog.Logger) *jwtSource {
	ctx, cancel := context.WithCancel(context.Background())
	return &jwtSource{
		flyCtx:   ctx,
		stopFly:  cancel,
		cache:    c,
		mint:     mint,
		now:      time.Now,
		log:      log,
		tokens:   lru.New[tokenKey, *jwtToken](maxJWTTokens),
		inflight: make(map[tokenKey]*flight),
	}
}

// Run waits for ctx to end, then stops the mints under way and waits for
// them: a mint is shared by every caller waiting for it, so no one
// caller's context may own it, and Run does. No mint starts after Run
// has returned.
func (j *jwtSource) Run(ctx context.Context) error {
	<-ctx.Done()
	j.mu.Lock()
	j.stopped = true
	j.mu.Unlock()
	j.stopFly()
	j.flights.Wait()
	return nil
}

// JWTBundlesResponse implements workloadapi.JWTSource from the cache.
func (j *jwtSource) JWTBundlesResponse(selectors []string) (*workload.JWTBundlesResponse, <-chan struct{}) {
	return j.cache.JWTBundlesResponse(selectors)
}

// JWTBundles implements workloadapi.JWTSource from the cache.
func (j *jwtSource) JWTBundles(selectors []string) *jwtbundle.Set {
	return j.cache.JWTBundles(selectors)
}

// normalizeAudience sorts and deduplicates: the same audience set in any
// order is the same token.
func normalizeAudience(aud []string) []string {
	out := slices.Clone(aud)
	slices.Sort(out)
	return slices.Compact(out)
}

// audienceKey names an audience set. Each value is length-prefixed, so
// that no value, whatever it holds, can make two different audience sets
// share a key (a separator alone let "p\x00q" pass for "p", "q").
func audienceKey(aud []string) string {
	var b strings.Builder
	for _, a := range aud {
		b.WriteString(strconv.Itoa(len(a)))
		b.WriteByte(':')
		b.WriteString(a)
	}
	return b.String()
}

// JWTSVIDs implements workloadapi.JWTSource: one token per entry the
// caller's selectors match (or only spiffeID's), from the cache when
// fresh, else from one signer call for all the misses, shared with any
// concurrent caller that needs the same tokens.
func (j *jwtSource) JWTSVIDs(ctx context.Context, selectors []string, spiffeID string, audience []string) ([]*workload.JWTSVID, error) {
	aud := normalizeAudience(audience)
	if len(aud) == 0 {
		return nil, errNoAudience
	}
	var want spiffeid.ID
	if spiffeID != "" {
		// An ID that does not parse is no entry's: not entitled.
		id, err := spiffeid.FromString(spiffeID)
		if err != nil {
			return nil, fmt.Errorf("%w: %s is not among the caller's identities", workloadapi.ErrNotEntitled, spiffeID)
		}
		want = id
	}
	entries := j.cache.jwtEntries(selectors, want)
	if len(entries) == 0 && !want.IsZero() {
		// Not an entry's own ID: an action identity of one of them?
		if e, name, ok := j.actionEntry(selectors, want); ok {
			svid, err := j.actionSVID(ctx, e, want, name, audience)
			if err != nil {
				return nil, err
			}
			return []*workload.JWTSVID{svid}, nil
		}
	}
	if len(entries) == 0 {
		if spiffeID != "" {
			return nil, fmt.Errorf("%w: %s is not among the caller's identities", workloadapi.ErrNotEntitled, spiffeID)
		}
		return nil, fmt.Errorf("%w: no entry matches the caller", workloadapi.ErrNotEntitled)
	}
	audKey := audienceKey(aud)
	now := j.now()
	toks := make([]*jwtToken, len(entries))
	flights := make([]*flight, len(entries))
	var mine []*signerpb.JWTSVIDRequest
	var mineFlights []*flight
	var mineEntries []*entry
	j.mu.Lock()
	for i, e := range entries {
		key := tokenKey{e.key(), audKey}
		if t := j.lookupLocked(key, now); t != nil && now.Before(t.renewAt()) {
			toks[i] = t
			continue
		}
		if f, ok := j.inflight[key]; ok {
			flights[i] = f
			continue
		}
		f := &flight{done: make(chan struct{})}
		flights[i] = f
		mine = append(mine, &signerpb.JWTSVIDRequest{EntryId: e.ID, Audience: aud})
		mineFlights = append(mineFlights, f)
		mineEntries = append(mineEntries, e)
	}
	stopped := j.stopped
	if len(mine) > 0 && !stopped {
		for i, f := range mineFlights {
			j.inflight[tokenKey{mineEntries[i].key(), audKey}] = f
		}
		// Off this caller's goroutine: the others sharing the flights
		// must get their answer even if this caller gives up.
		j.flights.Add(1)
		go func() {
			defer j.flights.Done()
			j.fly(j.flyCtx, mine, mineEntries, mineFlights, audKey)
		}()
	}
	j.mu.Unlock()
	if len(mine) > 0 && stopped {
		for _, f := range mineFlights {
			f.err = errNotRunning
			close(f.done)
		}
	}
	out := make([]*workload.JWTSVID, 0, len(entries))
	for i, e := range entries {
		t := toks[i]
		if t == nil {
			var err error
			if t, err = j.await(ctx, flights[i], e, audKey); err != nil {
				return nil, err
			}
		}
		out = append(out, &workload.JWTSVID{SpiffeId: e.SPIFFEID.String(), Svid: t.token, Hint: e.Hint})
	}
	return out, nil
}

// await waits for f. When the signer could not mint, a cached token that
// is still valid is served instead; an expired one never is.
func (j *jwtSource) await(ctx context.Context, f *flight, e *entry, audKey string) (*jwtToken, error) {
	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, fmt.Errorf("JWT-SVID for %s: %w", e.SPIFFEID, ctx.Err())
	}
	if f.err == nil {
		return f.tok, nil
	}
	j.mu.Lock()
	t := j.lookupLocked(tokenKey{e.key(), audKey}, j.now())
	j.mu.Unlock()
	if t != nil {
		j.log.Warn("jwt-svid renewal failed, serving the cached one", "spiffe_id", e.SPIFFEID.String(),
			"exp", t.exp.UTC().Format(time.RFC3339), "error", f.err)
		return t, nil
	}
	return nil, f.err
}

// fly mints the tokens of one caller's misses in batches and hands each
// result to its flight. ctx ends when Run does: a call is shared by every caller
// waiting for these tokens, so no one caller's deadline cuts it short
// (each stops waiting at its own); the minter bounds it.
func (j *jwtSource) fly(ctx context.Context, reqs []*signerpb.JWTSVIDRequest, entries []*entry, flights []*flight, audKey string) {
	for len(reqs) > 0 {
		n := min(len(reqs), maxBatch)
		resp, err := j.mint(ctx, reqs[:n])
		if err == nil && len(resp) != n {
			err = fmt.Errorf("signer answered %d of %d JWT-SVID requests", len(resp), n)
		}
		for i := range n {
			f, e := flights[i], entries[i]
			if err != nil {
				f.err = fmt.Errorf("mint JWT-SVID for %s: %w", e.SPIFFEID, err)
			} else {
				f.tok, f.err = tokenFrom(resp[i], e, audKey)
			}
			if f.err != nil {
				j.log.Warn("jwt-svid not obtained", "entry", e.ID, "spiffe_id", e.SPIFFEID.String(), "error", f.err)
			}
		}
		j.mu.Lock()
		for i := range n {
			f := flights[i]
			delete(j.inflight, tokenKey{entries[i].key(), audKey})
			if f.tok != nil {
				j.tokens.Add(f.tok.key, f.tok)
			}
			close(f.done)
		}
		j.mu.Unlock()
		reqs, entries, flights = reqs[n:], entries[n:], flights[n:]
	}
}

// tokenFrom checks one answer of the signer and reads the token's times.
// The signature is not checked: the token came over mTLS from the signer
// and the agent only reads its own token's times from it.
func tokenFrom(r *signerpb.MintedJWTSVID, e *entry, audKey string) (*jwtToken, error) {
	if r.GetError() != "" {
		return nil, fmt.Errorf("entry %q refused by signer: %s", e.ID, r.GetError())
	}
	if r.GetEntryId() != e.ID {
		return nil, fmt.Errorf("entry %q: signer answered for entry %q", e.ID, r.GetEntryId())
	}
	tok, err := jwt.ParseSigned(r.GetToken(), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("entry %q: parse JWT-SVID: %w", e.ID, err)
	}
	var c jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&c); err != nil {
		return nil, fmt.Errorf("entry %q: read JWT-SVID claims: %w", e.ID, err)
	}
	if c.Subject != e.SPIFFEID.String() || c.Expiry == nil || c.IssuedAt == nil || !c.Expiry.Time().After(c.IssuedAt.Time()) {
		return nil, fmt.Errorf("entry %q: JWT-SVID from signer lacks the entry's subject or a lifetime", e.ID)
	}
	return &jwtToken{key: tokenKey{e.key(), audKey}, token: r.GetToken(), sub: e.SPIFFEID, jti: c.ID,
		iat: c.IssuedAt.Time(), exp: c.Expiry.Time()}, nil
}

// lookupLocked returns the cached token for key if it is still valid at
// now, marking it recently used. An expired token is dropped. The key
// holds the entry revision, so a token minted for another revision of
// the entry is never found.
func (j *jwtSource) lookupLocked(key tokenKey, now time.Time) *jwtToken {
	t, ok := j.tokens.Get(key)
	if !ok {
		return nil
	}
	if !now.Before(t.exp) || j.revokedLocked(t, now) {
		j.tokens.Remove(key)
		return nil
	}
	return t
}

// retain drops the tokens of entries that left the sync or changed, and
// the expired ones.
func (j *jwtSource) retain(entries []*entry) {
	current := make(map[entryKey]bool, len(entries))
	for _, e := range entries {
		current[e.key()] = true
	}
	now := j.now()
	j.mu.Lock()
	defer j.mu.Unlock()
	j.tokens.DeleteFunc(func(k tokenKey, t *jwtToken) bool { return !current[k.entry] || !now.Before(t.exp) })
}

func (j *jwtSource) revokedLocked(t *jwtToken, now time.Time) bool {
	if j.guard == nil {
		return false
	}
	_, revoked := j.guard.Revoked(t.jti, t.sub, t.iat, now)
	return revoked
}

// dropRevoked drops every cached token a revocation in force covers, so
// that it is never served again: the next call mints anew.
func (j *jwtSource) dropRevoked() {
	now := j.now()
	j.mu.Lock()
	defer j.mu.Unlock()
	j.tokens.DeleteFunc(func(_ tokenKey, t *jwtToken) bool { return j.revokedLocked(t, now) })
}

// cached reports how many tokens the cache holds (status and tests).
func (j *jwtSource) cached() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.tokens.Len()
}

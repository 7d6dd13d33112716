package agent

import (
	"container/list"
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
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
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
// (SPIFFE ID, audience set) and reused until half their lifetime, so a
// busy caller does not reach the signer on every call; a stale token that
// is still valid is served when the signer cannot be reached; an expired
// one never is.
type jwtSource struct {
	cache *cache
	mint  jwtMinter
	now   func() time.Time
	max   int
	log   hclog.Logger

	mu       sync.Mutex
	tokens   map[string]*list.Element // by key; values are *jwtToken
	lru      *list.List               // most recently served first
	inflight map[string]*flight       // mints under way, by key
}

// jwtToken is one cached JWT-SVID, with the times read from its claims.
type jwtToken struct {
	key      string
	entryID  string
	revision uint64 // the entry revision it was minted for
	token    string
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

func newJWTSource(c *cache, mint jwtMinter, log hclog.Logger) *jwtSource {
	return &jwtSource{
		cache:    c,
		mint:     mint,
		now:      time.Now,
		max:      maxJWTTokens,
		log:      log,
		tokens:   make(map[string]*list.Element),
		lru:      list.New(),
		inflight: make(map[string]*flight),
	}
}

// JWTBundlesResponse implements workloadapi.JWTSource from the cache.
func (j *jwtSource) JWTBundlesResponse() (*workload.JWTBundlesResponse, <-chan struct{}) {
	return j.cache.JWTBundlesResponse()
}

// JWTBundles implements workloadapi.JWTSource from the cache.
func (j *jwtSource) JWTBundles() *jwtbundle.Set { return j.cache.JWTBundles() }

// normalizeAudience sorts and deduplicates: the same audience set in any
// order is the same token.
func normalizeAudience(aud []string) []string {
	out := slices.Clone(aud)
	slices.Sort(out)
	return slices.Compact(out)
}

// tokenKey names a cached token. Each audience value is length-prefixed,
// so that no value, whatever it holds, can make two different audience
// sets share a key (a separator alone let "p\x00q" pass for "p", "q").
func tokenKey(spiffeID string, aud []string) string {
	var b strings.Builder
	b.WriteString(spiffeID)
	for _, a := range aud {
		b.WriteByte(0)
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
	entries := j.cache.jwtEntries(selectors, spiffeID)
	if len(entries) == 0 {
		if spiffeID != "" {
			return nil, fmt.Errorf("%w: %s is not among the caller's identities", workloadapi.ErrNotEntitled, spiffeID)
		}
		return nil, fmt.Errorf("%w: no entry matches the caller", workloadapi.ErrNotEntitled)
	}
	now := j.now()
	toks := make([]*jwtToken, len(entries))
	flights := make([]*flight, len(entries))
	var mine []*signerpb.JWTSVIDRequest
	var mineFlights []*flight
	var mineEntries []*signerpb.Entry
	j.mu.Lock()
	for i, e := range entries {
		key := tokenKey(e.GetSpiffeId(), aud)
		if t := j.lookupLocked(key, e, now); t != nil && now.Before(t.renewAt()) {
			toks[i] = t
			continue
		}
		if f, ok := j.inflight[key]; ok {
			flights[i] = f
			continue
		}
		f := &flight{done: make(chan struct{})}
		j.inflight[key] = f
		flights[i] = f
		mine = append(mine, &signerpb.JWTSVIDRequest{EntryId: e.GetId(), Audience: aud})
		mineFlights = append(mineFlights, f)
		mineEntries = append(mineEntries, e)
	}
	j.mu.Unlock()
	if len(mine) > 0 {
		// Off this caller's goroutine: the others sharing the flights
		// must get their answer even if this caller gives up.
		go j.fly(mine, mineEntries, mineFlights, aud)
	}
	out := make([]*workload.JWTSVID, 0, len(entries))
	for i, e := range entries {
		t := toks[i]
		if t == nil {
			var err error
			if t, err = j.await(ctx, flights[i], e, aud); err != nil {
				return nil, err
			}
		}
		out = append(out, &workload.JWTSVID{SpiffeId: e.GetSpiffeId(), Svid: t.token, Hint: e.GetHint()})
	}
	return out, nil
}

// await waits for f. When the signer could not mint, a cached token that
// is still valid is served instead; an expired one never is.
func (j *jwtSource) await(ctx context.Context, f *flight, e *signerpb.Entry, aud []string) (*jwtToken, error) {
	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, fmt.Errorf("JWT-SVID for %s: %w", e.GetSpiffeId(), ctx.Err())
	}
	if f.err == nil {
		return f.tok, nil
	}
	j.mu.Lock()
	t := j.lookupLocked(tokenKey(e.GetSpiffeId(), aud), e, j.now())
	j.mu.Unlock()
	if t != nil {
		j.log.Warn("jwt-svid renewal failed, serving the cached one", "spiffe_id", e.GetSpiffeId(),
			"exp", t.exp.UTC().Format(time.RFC3339), "error", f.err)
		return t, nil
	}
	return nil, f.err
}

// fly mints the tokens of one caller's misses in batches and hands each
// result to its flight.
func (j *jwtSource) fly(reqs []*signerpb.JWTSVIDRequest, entries []*signerpb.Entry, flights []*flight, aud []string) {
	// A call is shared by every caller waiting for these tokens, so no
	// one caller's deadline cuts it short (each stops waiting at its
	// own); the minter bounds it.
	ctx := context.Background()
	for len(reqs) > 0 {
		n := min(len(reqs), maxBatch)
		resp, err := j.mint(ctx, reqs[:n])
		if err == nil && len(resp) != n {
			err = fmt.Errorf("signer answered %d of %d JWT-SVID requests", len(resp), n)
		}
		for i := range n {
			f, e := flights[i], entries[i]
			if err != nil {
				f.err = fmt.Errorf("mint JWT-SVID for %s: %w", e.GetSpiffeId(), err)
			} else {
				f.tok, f.err = tokenFrom(resp[i], e, aud)
			}
			if f.err != nil {
				j.log.Warn("jwt-svid not obtained", "entry", e.GetId(), "spiffe_id", e.GetSpiffeId(), "error", f.err)
			}
		}
		j.mu.Lock()
		for i := range n {
			f := flights[i]
			delete(j.inflight, tokenKey(entries[i].GetSpiffeId(), aud))
			if f.tok != nil {
				j.storeLocked(f.tok)
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
func tokenFrom(r *signerpb.MintedJWTSVID, e *signerpb.Entry, aud []string) (*jwtToken, error) {
	if r.GetError() != "" {
		return nil, fmt.Errorf("entry %q refused by signer: %s", e.GetId(), r.GetError())
	}
	if r.GetEntryId() != e.GetId() {
		return nil, fmt.Errorf("entry %q: signer answered for entry %q", e.GetId(), r.GetEntryId())
	}
	tok, err := jwt.ParseSigned(r.GetToken(), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("entry %q: parse JWT-SVID: %w", e.GetId(), err)
	}
	var c jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&c); err != nil {
		return nil, fmt.Errorf("entry %q: read JWT-SVID claims: %w", e.GetId(), err)
	}
	if c.Subject != e.GetSpiffeId() || c.Expiry == nil || c.IssuedAt == nil || !c.Expiry.Time().After(c.IssuedAt.Time()) {
		return nil, fmt.Errorf("entry %q: JWT-SVID from signer lacks the entry's subject or a lifetime", e.GetId())
	}
	return &jwtToken{
		key: tokenKey(e.GetSpiffeId(), aud), entryID: e.GetId(), revision: e.GetRevision(),
		token: r.GetToken(), iat: c.IssuedAt.Time(), exp: c.Expiry.Time(),
	}, nil
}

// lookupLocked returns the cached token for key if it is still valid at
// now and was minted for e as it is now, marking it recently used. An
// expired token, or one of an older revision, is dropped.
func (j *jwtSource) lookupLocked(key string, e *signerpb.Entry, now time.Time) *jwtToken {
	el, ok := j.tokens[key]
	if !ok {
		return nil
	}
	t := el.Value.(*jwtToken)
	if !now.Before(t.exp) || t.entryID != e.GetId() || t.revision != e.GetRevision() {
		j.lru.Remove(el)
		delete(j.tokens, key)
		return nil
	}
	j.lru.MoveToFront(el)
	return t
}

// storeLocked caches t, evicting the least recently used past the bound.
func (j *jwtSource) storeLocked(t *jwtToken) {
	if el, ok := j.tokens[t.key]; ok {
		el.Value = t
		j.lru.MoveToFront(el)
		return
	}
	j.tokens[t.key] = j.lru.PushFront(t)
	for j.lru.Len() > j.max {
		old := j.lru.Back()
		j.lru.Remove(old)
		delete(j.tokens, old.Value.(*jwtToken).key)
	}
}

// retain drops the tokens of entries that left the sync or changed, and
// the expired ones.
func (j *jwtSource) retain(entries []*signerpb.Entry) {
	rev := make(map[string]uint64, len(entries))
	for _, e := range entries {
		rev[e.GetId()] = e.GetRevision()
	}
	now := j.now()
	j.mu.Lock()
	defer j.mu.Unlock()
	for key, el := range j.tokens {
		t := el.Value.(*jwtToken)
		if r, ok := rev[t.entryID]; !ok || r != t.revision || !now.Before(t.exp) {
			j.lru.Remove(el)
			delete(j.tokens, key)
		}
	}
}

// cached reports how many tokens the cache holds (status and tests).
func (j *jwtSource) cached() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.lru.Len()
}

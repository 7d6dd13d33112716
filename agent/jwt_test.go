package agent

import (
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/lru"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// fakeMinter signs real ES256 tokens as the signer does, at the clock's
// time, and counts calls; down makes it fail, gate makes it wait.
type fakeMinter struct {
	key *ecdsa.PrivateKey
	kid string // "" means "k"
	now func() time.Time
	ttl time.Duration
	// actionTTL is the lifetime of action tokens.
	actionTTL time.Duration
	jtis      atomic.Int64
	calls     atomic.Int64
	reqs      atomic.Int64
	down      atomic.Bool
	gate      chan struct{} // nil: answer at once
}

func newFakeMinter(t testing.TB, now func() time.Time) *fakeMinter {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &fakeMinter{key: key, now: now, ttl: 5 * time.Minute, actionTTL: time.Minute}
}

func (m *fakeMinter) mint(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
	m.calls.Add(1)
	m.reqs.Add(int64(len(reqs)))
	if m.gate != nil {
		select {
		case <-m.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if m.down.Load() {
		return nil, errors.New("signer unreachable")
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: m.key, KeyID: cmp.Or(m.kid, "k")}}, nil)
	if err != nil {
		return nil, err
	}
	var out []*signerpb.MintedJWTSVID
	for _, r := range reqs {
		now := m.now()
		jti := fmt.Sprintf("jti-%d", m.jtis.Add(1))
		parent := "spiffe://example.org/" + r.GetEntryId()
		claims, ttl := map[string]any{}, m.ttl
		if r.GetAction() != "" {
			// As the signer mints an action identity (README).
			ttl = m.actionTTL
			claims["act"] = map[string]any{"sub": parent}
			parent += "/action/" + r.GetAction()
		}
		tok, err := jwt.Signed(sig).Claims(jwt.Claims{
			Subject: parent, Audience: r.GetAudience(), ID: jti,
			IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(ttl)),
		}).Claims(claims).Serialize()
		if err != nil {
			return nil, err
		}
		out = append(out, &signerpb.MintedJWTSVID{EntryId: r.GetEntryId(), Token: tok, Jti: jti, ExpiresAt: now.Add(ttl).Unix()})
	}
	return out, nil
}

// jwtTestSource is a jwtSource over a cache with entries "a" and "b"
// (both for uid 1) and "c" (uid 2), on a clock the test moves.
func jwtTestSource(t testing.TB) (*jwtSource, *fakeMinter, *time.Time) {
	t.Helper()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1"), testEntry("b", 1, "unix:uid:1"), testEntry("c", 1, "unix:uid:2")})
	m := newFakeMinter(t, func() time.Time { return now })
	j := newJWTSource(c, m.mint, hclog.NewNullLogger())
	j.now = func() time.Time { return now }
	runPart(t, j.Run)
	return j, m, &now
}

func fetch(t *testing.T, j *jwtSource, id string, aud ...string) (string, error) {
	t.Helper()
	svids, err := j.JWTSVIDs(t.Context(), []string{"unix:uid:1"}, id, aud)
	if err != nil {
		return "", err
	}
	if len(svids) != 1 {
		t.Fatalf("got %d JWT-SVIDs, want 1", len(svids))
	}
	return svids[0].GetSvid(), nil
}

func TestJWTSVIDsCache(t *testing.T) {
	j, m, now := jwtTestSource(t)
	const id = "spiffe://example.org/a"
	first, err := fetch(t, j, id, "x", "y")
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name      string
		advance   time.Duration
		down      bool
		aud       []string
		wantCalls int64
		want      string // "first", "new" or "error"
	}{
		{name: "hit", aud: []string{"x", "y"}, wantCalls: 1, want: "first"},
		{name: "same audience set in another order, repeated", aud: []string{"y", "x", "y"}, wantCalls: 1, want: "first"},
		{name: "other audience set misses", aud: []string{"x"}, wantCalls: 2, want: "new"},
		{name: "just before half-life: still a hit", advance: 150*time.Second - time.Nanosecond, aud: []string{"x", "y"}, wantCalls: 2, want: "first"},
		{name: "signer down past half-life: the still-valid token", advance: time.Nanosecond, down: true, aud: []string{"x", "y"}, wantCalls: 3, want: "first"},
		{name: "signer down at expiry: never the expired token", advance: 150 * time.Second, down: true, aud: []string{"x", "y"}, wantCalls: 4, want: "error"},
		{name: "signer back: a new token", aud: []string{"x", "y"}, wantCalls: 5, want: "new"},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			*now = now.Add(st.advance)
			m.down.Store(st.down)
			got, err := fetch(t, j, id, st.aud...)
			if c := m.calls.Load(); c != st.wantCalls {
				t.Errorf("signer calls = %d, want %d", c, st.wantCalls)
			}
			switch st.want {
			case "error":
				if err == nil {
					t.Fatalf("got a token, want an error")
				}
				return
			case "first":
				if err != nil || got != first {
					t.Errorf("got a different token or %v, want the cached one", err)
				}
			case "new":
				if err != nil || got == first || got == "" {
					t.Errorf("got the cached token or %v, want a new one", err)
				}
			}
		})
	}
}

func TestJWTSVIDsEntitlement(t *testing.T) {
	j, m, _ := jwtTestSource(t)
	tests := []struct {
		name      string
		selectors []string
		id        string
		aud       []string
		wantIDs   []string
		wantErr   error
	}{
		{name: "every matching entry, in policy order, one batch", selectors: []string{"unix:uid:1"}, aud: []string{"x"},
			wantIDs: []string{"spiffe://example.org/a", "spiffe://example.org/b"}},
		{name: "only the named one", selectors: []string{"unix:uid:1"}, id: "spiffe://example.org/b", aud: []string{"x"},
			wantIDs: []string{"spiffe://example.org/b"}},
		{name: "named one not among the caller's", selectors: []string{"unix:uid:1"}, id: "spiffe://example.org/c", aud: []string{"x"},
			wantErr: workloadapi.ErrNotEntitled},
		{name: "no entry matches", selectors: []string{"unix:uid:3"}, aud: []string{"x"}, wantErr: workloadapi.ErrNotEntitled},
		{name: "no audience", selectors: []string{"unix:uid:1"}, wantErr: errNoAudience},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := m.calls.Load()
			svids, err := j.JWTSVIDs(t.Context(), tt.selectors, tt.id, tt.aud)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("error = %v, want %v", err, tt.wantErr)
			}
			var ids []string
			for _, s := range svids {
				ids = append(ids, s.GetSpiffeId())
			}
			if !slices.Equal(ids, tt.wantIDs) {
				t.Errorf("SPIFFE IDs = %v, want %v", ids, tt.wantIDs)
			}
			if got := m.calls.Load() - calls; tt.wantErr == nil && tt.id == "" && got != 1 {
				t.Errorf("%d signer calls for %d misses, want one batch", got, len(ids))
			}
		})
	}
}

func TestJWTSVIDsBoundEvictsLeastRecentlyUsed(t *testing.T) {
	j, m, _ := jwtTestSource(t)
	j.tokens = lru.New[tokenKey, *jwtToken](3)
	const id = "spiffe://example.org/a"
	for _, aud := range []string{"1", "2", "3", "1", "4"} { // "1" used again before "4" comes in
		if _, err := fetch(t, j, id, aud); err != nil {
			t.Fatal(err)
		}
	}
	if n := j.cached(); n != 3 {
		t.Errorf("cache holds %d tokens, want the bound 3", n)
	}
	calls := m.calls.Load()
	if _, err := fetch(t, j, id, "1"); err != nil || m.calls.Load() != calls {
		t.Errorf("recently used token evicted (err %v)", err)
	}
	if _, err := fetch(t, j, id, "2"); err != nil || m.calls.Load() != calls+1 {
		t.Errorf("least recently used token not evicted (err %v)", err)
	}
}

func TestJWTSVIDsConcurrentCallersShareOneMint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		j, m, _ := jwtTestSource(t)
		m.gate = make(chan struct{})
		const callers = 50
		tokens := make([]string, callers)
		var wg sync.WaitGroup
		for i := range callers {
			wg.Go(func() {
				svids, err := j.JWTSVIDs(t.Context(), []string{"unix:uid:1"}, "spiffe://example.org/a", []string{"x"})
				if err != nil {
					t.Errorf("caller %d: %v", i, err)
					return
				}
				tokens[i] = svids[0].GetSvid()
			})
		}
		synctest.Wait() // every caller is waiting on the one call in flight
		close(m.gate)
		wg.Wait()
		if c := m.calls.Load(); c != 1 {
			t.Errorf("%d signer calls for %d concurrent callers, want 1", c, callers)
		}
		for i, tok := range tokens {
			if tok == "" || tok != tokens[0] {
				t.Fatalf("caller %d got another token than caller 0", i)
			}
		}
	})
}

func TestJWTSVIDsCallerGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		j, m, _ := jwtTestSource(t)
		m.gate = make(chan struct{})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() {
			_, err := j.JWTSVIDs(ctx, []string{"unix:uid:1"}, "spiffe://example.org/a", []string{"x"})
			done <- err
		}()
		synctest.Wait()
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("error = %v, want context.Canceled", err)
		}
		// The shared call still completes and fills the cache.
		close(m.gate)
		synctest.Wait()
		if _, err := j.JWTSVIDs(t.Context(), []string{"unix:uid:1"}, "spiffe://example.org/a", []string{"x"}); err != nil || m.calls.Load() != 1 {
			t.Errorf("after the abandoned call: err %v, %d signer calls, want a cache hit", err, m.calls.Load())
		}
	})
}

func TestJWTSVIDsRefusals(t *testing.T) {
	j, _, _ := jwtTestSource(t)
	tests := []struct {
		name string
		mint jwtMinter
	}{
		{"entry refused", func(_ context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
			return []*signerpb.MintedJWTSVID{{EntryId: reqs[0].GetEntryId(), Error: "entry is not authorized"}}, nil
		}},
		{"short answer", func(context.Context, []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
			return nil, nil
		}},
		{"garbage token", func(_ context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
			return []*signerpb.MintedJWTSVID{{EntryId: reqs[0].GetEntryId(), Token: "not.a.jwt"}}, nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j.mint = tt.mint
			if tok, err := fetch(t, j, "spiffe://example.org/a", "x"); err == nil {
				t.Errorf("got token %q, want an error", tok)
			}
			if n := j.cached(); n != 0 {
				t.Errorf("%d tokens cached after a refusal", n)
			}
		})
	}
}

func TestJWTSVIDsDropTokensOfLeftEntries(t *testing.T) {
	j, m, _ := jwtTestSource(t)
	if _, err := fetch(t, j, "spiffe://example.org/a", "x"); err != nil {
		t.Fatal(err)
	}
	if _, err := fetch(t, j, "spiffe://example.org/b", "x"); err != nil {
		t.Fatal(err)
	}
	entries := []*entry{testEntry("a", 2, "unix:uid:1"), testEntry("c", 1, "unix:uid:2")} // a changed, b left
	j.cache.setEntries(entries)
	j.retain(entries)
	if n := j.cached(); n != 0 {
		t.Errorf("%d tokens kept, want none: one entry left, the other changed", n)
	}
	calls := m.calls.Load()
	if _, err := fetch(t, j, "spiffe://example.org/a", "x"); err != nil || m.calls.Load() != calls+1 {
		t.Errorf("changed entry served from cache (err %v)", err)
	}
	if _, err := fetch(t, j, "spiffe://example.org/b", "x"); !errors.Is(err, workloadapi.ErrNotEntitled) {
		t.Errorf("entry that left: error %v, want ErrNotEntitled", err)
	}
}

func TestJWTBundle(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	c := newCache(td.String())
	if resp, _ := c.JWTBundlesResponse(nil); resp != nil || c.JWTBundles(nil).Len() != 0 {
		t.Fatal("a JWT bundle before any was received")
	}
	auth := func(kid string) *signerpb.JWTAuthority {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, _ := x509.MarshalPKIXPublicKey(k.Public())
		return &signerpb.JWTAuthority{KeyId: kid, PublicKey: der, ExpiresAt: 1}
	}
	k1, k2 := auth("k1"), auth("k2")
	steps := []struct {
		name        string
		keys        []*signerpb.JWTAuthority
		wantChanged bool
		wantKids    []string
	}{
		{"first", []*signerpb.JWTAuthority{k1}, true, []string{"k1"}},
		{"same keys, other expiry", []*signerpb.JWTAuthority{{KeyId: "k1", PublicKey: k1.PublicKey, ExpiresAt: 2}}, false, []string{"k1"}},
		{"successor published", []*signerpb.JWTAuthority{k1, k2}, true, []string{"k1", "k2"}},
		{"old key dropped", []*signerpb.JWTAuthority{k2}, true, []string{"k2"}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before, woken := c.JWTBundlesResponse(nil)
			changed, err := c.setJWTBundle(td, st.keys)
			if err != nil || changed != st.wantChanged {
				t.Fatalf("setJWTBundle = %v, %v; want %v", changed, err, st.wantChanged)
			}
			resp, _ := c.JWTBundlesResponse(nil)
			select {
			case <-woken:
				if !changed {
					t.Error("streams woken without a change")
				}
			default:
				if changed {
					t.Error("streams not woken on a change")
				}
			}
			if (resp == before) == changed {
				t.Errorf("response shared = %v with changed = %v", resp == before, changed)
			}
			jwks := resp.GetBundles()["spiffe://example.org"]
			b, err := jwtbundle.Parse(td, jwks)
			if err != nil {
				t.Fatalf("served JWKS does not parse: %v", err)
			}
			var doc struct {
				Keys []map[string]any `json:"keys"`
			}
			json.Unmarshal(jwks, &doc)
			var kids []string
			for _, k := range doc.Keys {
				kids = append(kids, fmt.Sprint(k["kid"]))
				if k["use"] != "jwt-svid" {
					t.Errorf("key %v has use %v, want jwt-svid", k["kid"], k["use"])
				}
			}
			if !slices.Equal(kids, st.wantKids) {
				t.Errorf("served kids = %v, want %v", kids, st.wantKids)
			}
			vb, ok := c.JWTBundles(nil).Get(td)
			if !ok || !vb.Equal(b) {
				t.Error("validation bundle differs from the served one")
			}
		})
	}
	if _, err := c.setJWTBundle(td, []*signerpb.JWTAuthority{{KeyId: "bad", PublicKey: []byte("junk")}}); err == nil {
		t.Error("garbage key accepted")
	}
	if resp, _ := c.JWTBundlesResponse(nil); len(resp.GetBundles()) != 1 {
		t.Error("a bad bundle replaced the good one")
	}
}

func TestReportJWT(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	a := New(&Config{TrustDomain: td}, nil)
	a.cache.setEntries([]*entry{testEntry("a", 1, "unix:uid:1")})
	m := newFakeMinter(t, time.Now)
	a.jwt.mint = m.mint
	runPart(t, a.jwt.Run)
	der, _ := x509.MarshalPKIXPublicKey(m.key.Public())
	if _, err := a.cache.setJWTBundle(td, []*signerpb.JWTAuthority{{KeyId: "k", PublicKey: der}}); err != nil {
		t.Fatal(err)
	}
	if _, err := fetch(t, a.jwt, "", "x"); err != nil {
		t.Fatal(err)
	}
	got := a.Report(time.Now()).JWT
	if !slices.Equal(got.KeyIDs, []string{"k"}) || got.TokensCached != 1 {
		t.Errorf("report jwt = %+v, want key_ids [k] and tokens_cached 1", got)
	}
}

// TestTokenKeyUnambiguous: no audience value can make two different
// (entry, audience set) pairs share a cached token.
func TestTokenKeyUnambiguous(t *testing.T) {
	pairs := []struct {
		id  string
		aud []string
	}{
		{"a", []string{"p\x00q"}},
		{"a", []string{"p", "q"}},
		{"a", []string{"p\x001:q"}},
		{"a", []string{"p:q"}},
		{"a", []string{"1:p"}},
		{"a\x001:p", nil},
		{"a", []string{""}},
		{"a", nil},
	}
	seen := map[tokenKey]int{}
	for i, p := range pairs {
		k := tokenKey{entryKey{p.id, 1}, audienceKey(p.aud)}
		if j, ok := seen[k]; ok {
			t.Errorf("pair %d (%q, %q) shares key %+v with pair %d (%q, %q)", i, p.id, p.aud, k, j, pairs[j].id, pairs[j].aud)
		}
		seen[k] = i
	}
	// The revision is part of the key: a token of revision 1 is never
	// found for revision 2.
	if (tokenKey{entryKey{"a", 1}, audienceKey([]string{"x"})}) == (tokenKey{entryKey{"a", 2}, audienceKey([]string{"x"})}) {
		t.Error("two revisions of one entry share a token key")
	}
}

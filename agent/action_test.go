package agent

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// actionTestSource is jwtTestSource with entry "a" allowing actions
// "github.read" and "db/*/migrate" (uid 1), and "b" allowing none.
func actionTestSource(t *testing.T) (*jwtSource, *fakeMinter, *time.Time) {
	t.Helper()
	j, m, now := jwtTestSource(t)
	a := testEntry("a", 2, "unix:uid:1") // a new revision: the cache takes it
	a.Actions = &actionPolicy{TTL: time.Minute, Names: []string{"github.read", "db/*/migrate"}}
	j.cache.setEntries([]*entry{a, testEntry("b", 1, "unix:uid:1"), testEntry("c", 1, "unix:uid:2")})
	return j, m, now
}

type actionClaims struct {
	jwt.Claims
	Act struct {
		Sub string `json:"sub"`
	} `json:"act"`
}

func readClaims(t *testing.T, tok string) actionClaims {
	t.Helper()
	p, err := jwt.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	var c actionClaims
	if err := p.UnsafeClaimsWithoutVerification(&c); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestActionSVIDs(t *testing.T) {
	j, m, _ := actionTestSource(t)
	tests := []struct {
		name    string
		id      string
		aud     []string
		refused string // "" means minted
	}{
		{"allowed name", "spiffe://example.org/a/action/github.read", []string{"x"}, ""},
		{"wildcard segment", "spiffe://example.org/a/action/db/orders/migrate", []string{"x"}, ""},
		{"other name", "spiffe://example.org/a/action/github.write", []string{"x"}, `action "github.write" is not among those entry spiffe://example.org/a allows`},
		{"wildcard is one segment", "spiffe://example.org/a/action/db/a/b/migrate", []string{"x"}, `action "db/a/b/migrate" is not among`},
		{"two audiences", "spiffe://example.org/a/action/github.read", []string{"x", "y"}, "exactly one audience, not 2"},
		{"entry without actions", "spiffe://example.org/b/action/github.read", []string{"x"}, "entry spiffe://example.org/b allows no action identities"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := m.calls.Load()
			svids, err := j.JWTSVIDs(t.Context(), []string{"unix:uid:1"}, tt.id, tt.aud)
			if tt.refused != "" {
				if !errors.Is(err, workloadapi.ErrActionRefused) || !strings.Contains(err.Error(), tt.refused) {
					t.Fatalf("error %v, want ErrActionRefused saying %q", err, tt.refused)
				}
				if m.calls.Load() != calls {
					t.Error("a refused action reached the signer")
				}
				return
			}
			if err != nil || len(svids) != 1 || svids[0].GetSpiffeId() != tt.id {
				t.Fatalf("got %v, %v; want one JWT-SVID for %s", svids, err, tt.id)
			}
			c := readClaims(t, svids[0].GetSvid())
			if c.Subject != tt.id || c.Act.Sub != "spiffe://example.org/a" || c.ID == "" {
				t.Errorf("claims sub %q act %q jti %q", c.Subject, c.Act.Sub, c.ID)
			}
		})
	}
	// Not an action ID of any of the caller's entries: the usual refusal.
	if _, err := fetch(t, j, "spiffe://example.org/c/action/github.read", "x"); !errors.Is(err, workloadapi.ErrNotEntitled) {
		t.Errorf("another caller's entry: error %v, want ErrNotEntitled", err)
	}
}

func TestActionSVIDsNeverCached(t *testing.T) {
	j, m, _ := actionTestSource(t)
	seen := map[string]bool{}
	for range 3 {
		tok, err := fetch(t, j, "spiffe://example.org/a/action/github.read", "x")
		if err != nil {
			t.Fatal(err)
		}
		if jti := readClaims(t, tok).ID; seen[jti] {
			t.Errorf("jti %s served twice", jti)
		} else {
			seen[jti] = true
		}
	}
	if m.calls.Load() != 3 || j.cached() != 0 {
		t.Errorf("%d mints, %d cached: want 3 mints and nothing cached", m.calls.Load(), j.cached())
	}
}

func TestActionSVIDsSignerAnswerChecked(t *testing.T) {
	j, _, _ := actionTestSource(t)
	j.mint = func(_ context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
		return []*signerpb.MintedJWTSVID{{EntryId: reqs[0].GetEntryId(), Error: "action not allowed"}}, nil
	}
	_, err := fetch(t, j, "spiffe://example.org/a/action/github.read", "x")
	if !errors.Is(err, workloadapi.ErrActionRefused) {
		t.Errorf("signer refusal: error %v, want ErrActionRefused", err)
	}
	// A plain token (no act claim) for an action request is refused.
	j2, m2, _ := actionTestSource(t)
	j2.mint = func(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
		plain := &signerpb.JWTSVIDRequest{EntryId: reqs[0].GetEntryId(), Audience: reqs[0].GetAudience()}
		return m2.mint(ctx, []*signerpb.JWTSVIDRequest{plain})
	}
	if _, err := fetch(t, j2, "spiffe://example.org/a/action/github.read", "x"); err == nil {
		t.Error("a token without the action subject was served")
	}
}

func TestRevocationsDropCachedTokens(t *testing.T) {
	j, m, now := jwtTestSource(t)
	guard := workloadapi.NewTokenGuard(0)
	j.guard = guard
	tokA, err := fetch(t, j, "spiffe://example.org/a", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fetch(t, j, "spiffe://example.org/b", "x"); err != nil {
		t.Fatal(err)
	}
	s := served{cache: j.cache, jwt: j, tokens: guard, log: hclog.NewNullLogger()}
	tests := []struct {
		name string
		rev  workloadapi.Revocation
	}{
		{"by jti", workloadapi.Revocation{JTI: readClaims(t, tokA).ID, Reason: "leaked"}},
		{"by spiffe id", workloadapi.Revocation{SPIFFEID: spiffeid.RequireFromString("spiffe://example.org/a"), IssuedBefore: now.Add(time.Second), Reason: "leaked"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := fetch(t, j, "spiffe://example.org/a", "x")
			if err != nil {
				t.Fatal(err)
			}
			tt.rev.ExpiresAt = now.Add(time.Hour)
			if tt.rev.JTI != "" {
				tt.rev.JTI = readClaims(t, tok).ID
			}
			s.setRevocations([]workloadapi.Revocation{tt.rev})
			if j.cached() != 1 {
				t.Errorf("%d tokens cached, want only b's", j.cached())
			}
			calls := m.calls.Load()
			if _, err := fetch(t, j, "spiffe://example.org/a", "x"); err != nil || m.calls.Load() != calls+1 {
				t.Errorf("after the revocation the token was served from cache (err %v)", err)
			}
			s.setRevocations(nil)
		})
	}
}

func TestRevocationsFrom(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	in := []*signerpb.TokenRevocation{
		{Jti: "j1", Reason: "r", ExpiresAt: now.Unix() + 60},
		{SpiffeId: "spiffe://example.org/a", IssuedBefore: now.Unix(), Reason: "r", ExpiresAt: now.Unix() + 60},
		{Jti: "expired", ExpiresAt: now.Add(-workloadapi.JWTLeeway).Unix()},
		{SpiffeId: "not an id", IssuedBefore: now.Unix(), ExpiresAt: now.Unix() + 60},
		{SpiffeId: "spiffe://example.org/a", ExpiresAt: now.Unix() + 60}, // no time
	}
	got := revocationsFrom(in, now, hclog.NewNullLogger())
	if len(got) != 2 || got[0].JTI != "j1" || got[1].SPIFFEID.String() != "spiffe://example.org/a" || !got[1].IssuedBefore.Equal(now) {
		t.Errorf("got %+v, want the jti one and the SPIFFE ID one", got)
	}
}

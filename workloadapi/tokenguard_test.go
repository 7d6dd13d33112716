package workloadapi

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// startGuardedServer serves src with guard as its TokenGuard.
func startGuardedServer(t *testing.T, src JWTSource, guard *TokenGuard) *running {
	t.Helper()
	return startServerWith(t, Config{SocketPath: filepath.Join(socketDir(t), "w.sock"), Attestor: unixOnly,
		Source: newFakeSource(nil), JWT: src, Tokens: guard})
}

// actionToken is a fresh action token of spiffe://example.org/web for
// action "deploy" and audience "a".
func actionToken(t *testing.T, iss *jwtIssuer, jti string) string {
	t.Helper()
	c := jwtClaims(time.Now(), "/web/action/deploy", "a")
	c["act"] = map[string]any{"sub": "spiffe://example.org/web"}
	if jti != "" {
		c["jti"] = jti
	}
	return iss.mint(t, c)
}

func TestValidateJWTSVIDSingleUse(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	srv := startGuardedServer(t, newFakeJWTSource(t, iss), NewTokenGuard(0))
	client := rawClient(t, srv.path)
	plain := iss.mint(t, with(jwtClaims(time.Now(), "/web", "a"), "jti", "plain-1"))
	tests := []struct {
		name    string
		token   string
		wantMsg []string // per validation, in order; "" accepted
	}{
		{"action token once only", actionToken(t, iss, "act-1"), []string{"", "token already used", "token already used"}},
		{"another action token is its own", actionToken(t, iss, "act-2"), []string{"", "token already used"}},
		{"action token without jti", actionToken(t, iss, ""), []string{"action token has no jti claim"}},
		{"plain JWT-SVID is reusable", plain, []string{"", "", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i, want := range tt.wantMsg {
				_, err := client.ValidateJWTSVID(withHeader(t.Context()), &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: tt.token})
				if want == "" {
					if err != nil {
						t.Fatalf("validation %d: %v, want accepted", i+1, err)
					}
					continue
				}
				if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), want) {
					t.Fatalf("validation %d: %v, want InvalidArgument %q", i+1, err, want)
				}
			}
		})
	}
	// The audit: one line per decision on an action token, by jti, with
	// the parent and the caller; never the token.
	logs := srv.logs.waitFor(t, `"@message":"validated action JWT-SVID"`)
	for _, want := range []string{`"jti":"act-1"`, `"act":"spiffe://example.org/web"`, `"sub":"spiffe://example.org/web/action/deploy"`, `"reason":"token already used"`, `"exe":"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("audit lacks %s:\n%s", want, logs)
		}
	}
	if tok := actionToken(t, iss, "act-1"); strings.Contains(logs, strings.Split(tok, ".")[2]) {
		t.Error("a token signature is in the logs")
	}
}

func TestValidateJWTSVIDRevoked(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	guard := NewTokenGuard(0)
	srv := startGuardedServer(t, newFakeJWTSource(t, iss), guard)
	client := rawClient(t, srv.path)
	now := time.Now()
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	guard.SetRevocations([]Revocation{
		{JTI: "leaked-1", Reason: "leaked in CI logs", ExpiresAt: now.Add(time.Hour)},
		{SPIFFEID: web, IssuedBefore: now, Reason: "host compromised", ExpiresAt: now.Add(time.Hour)},
		{JTI: "gone", Reason: "expired revocation", ExpiresAt: now.Add(-JWTLeeway - time.Second)},
		{JTI: "leeway", Reason: "within the leeway", ExpiresAt: now.Add(-time.Second)},
	}, now)
	// The signer drops an expired revocation from its next message; the
	// agent keeps it for the leeway its validation allows.
	kept := []Revocation{
		{JTI: "leaked-1", Reason: "leaked in CI logs", ExpiresAt: now.Add(time.Hour)},
		{SPIFFEID: web, IssuedBefore: now, Reason: "host compromised", ExpiresAt: now.Add(time.Hour)},
	}
	guard.SetRevocations(kept, now)
	db := func(jti string) string { return iss.mint(t, with(jwtClaims(now, "/db", "a"), "jti", jti)) }
	tests := []struct {
		name    string
		token   string
		wantMsg string // "" accepted
	}{
		{"by jti", db("leaked-1"), "token revoked: leaked in CI logs"},
		{"other jti", db("fine"), ""},
		{"by SPIFFE ID, issued before", iss.mint(t, with(jwtClaims(now, "/web", "a"), "iat", now.Add(-time.Minute).Unix())), "token revoked: host compromised"},
		{"by SPIFFE ID, issued after", iss.mint(t, with(jwtClaims(now, "/web", "a"), "iat", now.Add(time.Second).Unix())), ""},
		{"action token of a revoked jti", actionToken(t, iss, "leaked-1"), "token revoked: leaked in CI logs"},
		{"expired revocation is dropped", db("gone"), ""},
		{"revocation kept for the leeway", db("leeway"), "token revoked: within the leeway"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := client.ValidateJWTSVID(withHeader(t.Context()), &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: tt.token})
			if tt.wantMsg == "" {
				if err != nil {
					t.Fatalf("%v, want accepted", err)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != tt.wantMsg {
				t.Fatalf("%v, want InvalidArgument %q", err, tt.wantMsg)
			}
		})
	}
	if n := guard.Revocations(now); n != 3 {
		t.Errorf("%d revocations in force, want 3 (the expired one dropped)", n)
	}
	if n := guard.Revocations(now.Add(JWTLeeway)); n != 2 {
		t.Errorf("%d revocations in force after the leeway, want 2", n)
	}
}

func TestTokenGuardBound(t *testing.T) {
	g := NewTokenGuard(2)
	now := time.Unix(1_000_000, 0)
	tok := func(jti string, ttl time.Duration) verifiedToken {
		return verifiedToken{jti: jti, isAction: true, iat: now, exp: now.Add(ttl)}
	}
	for i := range 2 {
		if err := g.admit(tok(fmt.Sprint(i), time.Minute), now); err != nil {
			t.Fatal(err)
		}
	}
	// Full: a new one is refused rather than an old one forgotten.
	if err := g.admit(tok("new", time.Minute), now); !errors.Is(err, ErrTooManyActionTokens) {
		t.Fatalf("at the cap: %v, want ErrTooManyActionTokens", err)
	}
	if err := g.admit(tok("0", time.Minute), now); !errors.Is(err, ErrTokenUsed) {
		t.Fatalf("a used one at the cap: %v, want ErrTokenUsed", err)
	}
	// Once they are past exp and the leeway, they are swept.
	later := now.Add(time.Minute + JWTLeeway)
	if err := g.admit(tok("new", time.Hour), later); err != nil || g.Used() != 1 {
		t.Fatalf("after expiry: %v, %d remembered; want accepted, 1", err, g.Used())
	}
}

func TestFetchJWTSVIDAction(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	src := newFakeJWTSource(t, iss)
	action := "spiffe://example.org/web/action/deploy"
	src.entitle(uidSelector(), action)
	srv := startGuardedServer(t, src, NewTokenGuard(0))
	client := rawClient(t, srv.path)
	resp, err := client.FetchJWTSVID(withHeader(t.Context()), &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: action})
	if err != nil || len(resp.GetSvids()) != 1 {
		t.Fatalf("%v, %v", resp, err)
	}
	logs := srv.logs.waitFor(t, `"@message":"served action JWT-SVID"`)
	for _, want := range []string{`"parent_id":"spiffe://example.org/web"`, `"action":"deploy"`, `"jti":"jti-`, `"exp":"`, `"pid":`, `"exe":"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("audit lacks %s:\n%s", want, logs)
		}
	}
	if strings.Contains(logs, resp.GetSvids()[0].GetSvid()) {
		t.Error("the token is in the logs")
	}

	// A refusal of the source is PermissionDenied with its reason.
	src.err = fmt.Errorf("%w: action %q is not among those entry web allows", ErrActionRefused, "drop")
	_, err = client.FetchJWTSVID(withHeader(t.Context()), &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: action})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), `action "drop" is not among`) {
		t.Errorf("refused action: %v, want PermissionDenied with the reason", err)
	}
}

package signer

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// jwtPolicy has node "lab" (the test agent's) and "other", with entries
// on each.
const jwtPolicy = `
node "lab" {
  ek_sha256 = ["` + "abababababababababababababababababababababababababababababababab" + `"]
}
node "other" {
  ek_sha256 = ["` + "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd" + `"]
}
workload "mine" {
  spiffe_id = "spiffe://example.org/mine"
  nodes     = ["lab"]
  selectors = ["unix:uid:1000"]
  jwt_ttl   = "2h"
}
workload "short" {
  spiffe_id = "spiffe://example.org/short"
  nodes     = ["lab"]
  selectors = ["unix:uid:1001"]
  jwt_ttl   = "30s"
}
workload "theirs" {
  spiffe_id = "spiffe://example.org/theirs"
  nodes     = ["other"]
  selectors = ["unix:uid:1002"]
}
`

var testAgent = spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/ab")

// newJWTTestSigner is a signer with jwtPolicy and an attested agent of
// node "lab" (the record the Attest RPC would leave).
func newJWTTestSigner(t *testing.T, dir, extra string) *Signer {
	t.Helper()
	cfg := testConfig(t, dir, extra)
	if err := os.WriteFile(cfg.PolicyPath, []byte(jwtPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	s.agents[testAgent] = &agentRecord{names: []string{"lab"}}
	return s
}

// mintJWT mints a token for testID as the API does: through the
// authority, under the lock.
func mintJWT(t *testing.T, s *Signer, ttl time.Duration, now time.Time) (token, kid string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.auth.mintJWT(jwtClaims{sub: testID, audience: []string{"a"}, ttl: ttl}, now)
	if err != nil {
		t.Fatalf("mintJWT at %v: %v", now, err)
	}
	return m.token, m.kid
}

// jwtBundle is the JWT bundle the signer sends agents, as go-spiffe holds it.
func jwtBundle(t *testing.T, s *Signer) *jwtbundle.Bundle {
	t.Helper()
	s.mu.Lock()
	msg := s.bundleMessageLocked()
	s.mu.Unlock()
	b := jwtbundle.New(testTD)
	for _, a := range msg.GetJwtAuthorities() {
		pub, err := x509.ParsePKIXPublicKey(a.GetPublicKey())
		if err != nil {
			t.Fatalf("bundle key %s: %v", a.GetKeyId(), err)
		}
		if err := b.AddJWTAuthority(a.GetKeyId(), pub); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// verifyAt checks token's signature against the bundle and its times at
// now (go-spiffe's ParseAndValidate only knows the wall clock).
func verifyAt(t *testing.T, token string, b *jwtbundle.Bundle, now time.Time) error {
	t.Helper()
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	pub, ok := b.FindJWTAuthority(tok.Headers[0].KeyID)
	if !ok {
		return errors.New("kid not in the bundle")
	}
	var c jwt.Claims
	if err := tok.Claims(pub, &c); err != nil {
		return err
	}
	return c.ValidateWithLeeway(jwt.Expected{Time: now, AnyAudience: jwt.Audience{"a"}}, 0)
}

func kids(b *jwtbundle.Bundle) []string {
	var out []string
	for kid := range b.JWTAuthorities() {
		out = append(out, kid)
	}
	slices.Sort(out)
	return out
}

func TestMintJWTSVID(t *testing.T) {
	s := newJWTTestSigner(t, t.TempDir(), "jwt_max_ttl = \"1h\"\n")
	tests := []struct {
		name     string
		agent    spiffeid.ID
		entry    string
		audience []string
		wantSub  string
		wantTTL  time.Duration
		wantErr  error
	}{
		{name: "own entry, jwt_ttl capped at jwt_max_ttl", entry: "mine", audience: []string{"a"}, wantSub: "spiffe://example.org/mine", wantTTL: time.Hour},
		{name: "own entry, short jwt_ttl, two audiences", entry: "short", audience: []string{"a", "b"}, wantSub: "spiffe://example.org/short", wantTTL: 30 * time.Second},
		{name: "another node's entry", entry: "theirs", audience: []string{"a"}, wantErr: ErrEntryNotAuthorized},
		{name: "unknown entry", entry: "nosuch", audience: []string{"a"}, wantErr: ErrUnknownEntry},
		{name: "no audience", entry: "mine", wantErr: ErrNoAudience},
		{name: "empty audience value", entry: "mine", audience: []string{"a", ""}, wantErr: ErrBadAudience},
		{name: "too many audiences", entry: "mine", audience: slices.Repeat([]string{"a"}, maxAudiences+1), wantErr: ErrBadAudience},
		{name: "oversized audience", entry: "mine", audience: []string{strings.Repeat("a", maxAudienceBytes+1)}, wantErr: ErrBadAudience},
		{name: "agent not attested here", agent: spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/cd"), entry: "mine", audience: []string{"a"},
			wantErr: errors.New("agent is not attested with this signer")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			agent := testAgent
			if !tt.agent.IsZero() {
				agent = tt.agent
			}
			now := time.Now()
			m, err := s.mintOne(agent, &signerpb.JWTSVIDRequest{EntryId: tt.entry, Audience: tt.audience}, now)
			if tt.wantErr != nil {
				if err == nil || (!errors.Is(err, tt.wantErr) && !strings.Contains(err.Error(), tt.wantErr.Error())) {
					t.Fatalf("mintOne error = %v, want %v", err, tt.wantErr)
				}
				if m != nil {
					t.Error("a token along with the error")
				}
				return
			}
			if err != nil {
				t.Fatalf("mintOne: %v", err)
			}
			checkToken(t, s, m.token, tt.wantSub, tt.audience, now, tt.wantTTL)
			if m.kid != s.auth.activeJWT.kid {
				t.Errorf("kid = %q, want the active key's %q", m.kid, s.auth.activeJWT.kid)
			}
		})
	}
}

// checkToken checks the header, the claims, the lifetime and that
// go-spiffe accepts the token against the signer's JWT bundle.
func checkToken(t *testing.T, s *Signer, token, sub string, aud []string, now time.Time, ttl time.Duration) {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts, want 3", len(parts))
	}
	var header map[string]any
	var claims map[string]json.RawMessage
	for i, dst := range []any{&header, &claims} {
		raw, err := base64.RawURLEncoding.DecodeString(parts[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			t.Fatal(err)
		}
	}
	if header["alg"] != "ES256" || header["typ"] != "JWT" || header["kid"] == "" || header["kid"] == nil {
		t.Errorf("header = %v, want alg ES256, typ JWT and a kid", header)
	}
	wantAud, _ := json.Marshal(aud)
	if len(aud) == 1 {
		wantAud, _ = json.Marshal(aud[0])
	}
	if got := string(claims["aud"]); got != string(wantAud) {
		t.Errorf("aud = %s, want %s", got, wantAud)
	}
	svid, err := jwtsvid.ParseAndValidate(token, jwtBundle(t, s), aud[:1])
	if err != nil {
		t.Fatalf("go-spiffe refuses the token: %v", err)
	}
	if svid.ID.String() != sub {
		t.Errorf("sub = %s, want %s", svid.ID, sub)
	}
	iat := now.Truncate(time.Second)
	if got := svid.Claims["iat"]; got != float64(iat.Unix()) {
		t.Errorf("iat = %v, want %d", got, iat.Unix())
	}
	if !svid.Expiry.Equal(iat.Add(ttl)) {
		t.Errorf("exp = %v, want iat + %v = %v", svid.Expiry, ttl, iat.Add(ttl))
	}
}

func TestJWTKeyRotation(t *testing.T) {
	s := newJWTTestSigner(t, t.TempDir(), "jwt_max_ttl = \"12h\"\n") // ca_ttl 24h, lead 4h
	t0 := issued(s.auth.active)
	prepareAt, activateAt := t0.Add(8*time.Hour), t0.Add(12*time.Hour)
	k0 := s.auth.activeJWT.kid

	if _, err := s.advanceCAs(prepareAt); err != nil {
		t.Fatal(err)
	}
	k1 := s.auth.nextJWT.kid
	want := []string{k0, k1}
	slices.Sort(want)
	if got := kids(jwtBundle(t, s)); !slices.Equal(got, want) {
		t.Fatalf("bundle after prepare = %v, want %v", got, want)
	}
	// Published, not signing yet: the old key signs until half-life.
	if _, kid := mintJWT(t, s, time.Hour, prepareAt); kid != k0 {
		t.Errorf("token minted after the successor was published has kid %s, want the old key %s", kid, k0)
	}
	// The longest token the old key signs, at its last instant.
	last, kid := mintJWT(t, s, s.cfg.JWTMaxTTL, activateAt.Add(-time.Second))
	if kid != k0 {
		t.Fatalf("last token before half-life has kid %s, want %s", kid, k0)
	}
	lastExp := activateAt.Add(-time.Second).Truncate(time.Second).Add(s.cfg.JWTMaxTTL)
	if _, kid := mintJWT(t, s, time.Hour, activateAt); kid != k1 {
		t.Errorf("token minted at half-life has kid %s, want the successor %s", kid, k1)
	}
	if _, err := s.advanceCAs(activateAt); err != nil {
		t.Fatal(err)
	}
	if got := kids(jwtBundle(t, s)); !slices.Equal(got, want) {
		t.Errorf("JWT bundle after the hand-over = %v, want still %v", got, want)
	}

	// Step through every decision until the old key's last token expires:
	// it validates at each, and the key is still there.
	for now := activateAt; ; {
		next, err := s.advanceCAs(now)
		if err != nil {
			t.Fatal(err)
		}
		if err := verifyAt(t, last, jwtBundle(t, s), now); err != nil {
			t.Fatalf("at %v: the old key's last token does not validate: %v", now, err)
		}
		if now.Equal(lastExp) {
			break
		}
		now = earliest(next, lastExp)
	}
	if _, err := s.advanceCAs(rotator.DropAt(lastExp)); err != nil {
		t.Fatal(err)
	}
	if jwtBundle(t, s).HasJWTAuthority(k0) {
		t.Error("old key still published after its last token expired")
	}
	keys, err := loadJWTState(s.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(keys, func(k publicJWTKey) bool { return k.kid == k0 }) {
		t.Error("old key still in the state file after its last token expired")
	}
}

func TestRestartKeepsJWTKeys(t *testing.T) {
	dir := t.TempDir()
	s1 := newJWTTestSigner(t, dir, "")
	if err := s1.publish(s1.auth.publication()); err != nil {
		t.Fatal(err)
	}
	m, err := s1.mintOne(testAgent, &signerpb.JWTSVIDRequest{EntryId: "mine", Audience: []string{"a"}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}

	s2 := newJWTTestSigner(t, dir, "")
	if err := s2.publish(s2.auth.publication()); err != nil {
		t.Fatal(err)
	}
	b2 := jwtBundle(t, s2)
	if !b2.HasJWTAuthority(m.kid) || len(b2.JWTAuthorities()) != 2 {
		t.Fatalf("bundle after restart = %v, want the earlier key %s and a fresh one", kids(b2), m.kid)
	}
	if _, err := jwtsvid.ParseAndValidate(m.token, b2, []string{"a"}); err != nil {
		t.Errorf("token minted before the restart does not validate after it: %v", err)
	}
	if _, kid := mintJWT(t, s2, time.Minute, time.Now()); kid == m.kid {
		t.Error("restarted signer signs with the restored key")
	}

	// The file is a JWKS of public keys, each "use": "jwt-svid".
	data, err := os.ReadFile(filepath.Join(s2.cfg.StateDir, JWTStateFile))
	if err != nil {
		t.Fatal(err)
	}
	set, err := jwtbundle.Parse(testTD, data)
	if err != nil {
		t.Fatalf("state file is not a JWT bundle: %v", err)
	}
	if !set.Equal(b2) {
		t.Errorf("state file keys = %v, bundle = %v", kids(set), kids(b2))
	}
	var doc struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	for _, k := range doc.Keys {
		if k["use"] != "jwt-svid" || k["d"] != nil || k["keep_until"] == nil {
			t.Errorf("state key %v: want use jwt-svid, keep_until, and no private part", k["kid"])
		}
	}
}

func TestRestartDropsExpiredJWTKeys(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	live, expired := testPublicKey(t, now.Add(time.Hour)), testPublicKey(t, now.Add(-time.Second))
	if err := saveJWTState(filepath.Join(dir, "state"), []publicJWTKey{live, expired}); err != nil {
		t.Fatal(err)
	}
	b := jwtBundle(t, newJWTTestSigner(t, dir, ""))
	if !b.HasJWTAuthority(live.kid) || b.HasJWTAuthority(expired.kid) || len(b.JWTAuthorities()) != 2 {
		t.Errorf("bundle = %v, want the fresh key and %s, not %s", kids(b), live.kid, expired.kid)
	}
}

func testPublicKey(t *testing.T, keepUntil time.Time) publicJWTKey {
	t.Helper()
	k, err := newJWTKey(keepUntil)
	if err != nil {
		t.Fatal(err)
	}
	return k.public()
}

func TestRestartRefusesBadJWTState(t *testing.T) {
	k, err := newJWTKey(time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	good, err := marshalJWKS([]publicJWTKey{k.public()}, func(publicJWTKey) map[string]any {
		return map[string]any{"keep_until": time.Now().Add(time.Hour).Format(time.RFC3339)}
	})
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(good, &doc); err != nil {
		t.Fatal(err)
	}
	priv, err := jose.JSONWebKey{Key: k.priv, KeyID: "p", Use: jwtUse}.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	var privMap map[string]any
	json.Unmarshal(priv, &privMap)
	privMap["keep_until"] = time.Now().Format(time.RFC3339)
	secret := privMap["d"].(string)
	edit := func(f func(map[string]any)) string {
		m := make(map[string]any)
		for k, v := range doc.Keys[0] {
			m[k] = v
		}
		f(m)
		b, _ := json.Marshal(map[string]any{"keys": []any{m}})
		return string(b)
	}
	keysOf := func(ms ...any) string {
		b, _ := json.Marshal(map[string]any{"keys": ms})
		return string(b)
	}
	tests := []struct {
		name, src, want string
	}{
		{"not JSON", "hello", "not a JSON key set"},
		{"trailing data", string(good) + "{}", "not a JSON key set"},
		{"not a JWK", `{"keys":[{"kty":"nope"}]}`, "key 1: not a JWK"},
		{"private key", keysOf(doc.Keys[0], privMap), "key 2 holds a private key"},
		{"symmetric key", `{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s","use":"jwt-svid"}]}`, "key 1 holds a private key"},
		{"no kid", edit(func(m map[string]any) { delete(m, "kid") }), `key 1: missing or repeated kid ""`},
		{"repeated kid", keysOf(doc.Keys[0], doc.Keys[0]), "key 2: missing or repeated kid"},
		{"wrong use", edit(func(m map[string]any) { m["use"] = "sig" }), `has use "sig", want "jwt-svid"`},
		{"no keep_until", edit(func(m map[string]any) { delete(m, "keep_until") }), "missing or bad keep_until"},
		{"bad keep_until", edit(func(m map[string]any) { m["keep_until"] = "soon" }), "missing or bad keep_until"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state", JWTStateFile)
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(tt.src), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := New(testConfig(t, dir, ""), nil)
			if !errors.Is(err, ErrBadJWTState) {
				t.Fatalf("New error = %v, want ErrBadJWTState", err)
			}
			if want := "restore earlier JWT keys: unusable JWT key state file " + path + ": "; !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %q\nwant    %q...%q", err, want, tt.want)
			}
			if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), "c2VjcmV0") {
				t.Error("error echoes key material")
			}
		})
	}
}

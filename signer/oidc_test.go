package signer

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testport"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// oidcSigner is a signer with jwtPolicy, an attested agent of node "lab"
// and an oidc_discovery block on a loopback port whose http:// URL is the
// issuer, serving until the test ends.
type oidcSigner struct {
	*Signer
	issuer string
	client *http.Client // its own transport: idle connections end with the test
}

func startOIDCSigner(t *testing.T, extra string) *oidcSigner {
	t.Helper()
	return startOIDCSignerWith(t, extra, "http", "", &http.Transport{})
}

// startOIDCSignerWith is startOIDCSigner with the issuer's scheme, the
// block's tls block and the relying party's transport.
func startOIDCSignerWith(t *testing.T, extra, scheme, tlsBlock string, tr *http.Transport) *oidcSigner {
	t.Helper()
	addr := testport.Free(t)
	issuer := scheme + "://" + addr
	s := newJWTTestSigner(t, t.TempDir(), extra+"oidc_discovery {\n  listen_address = \""+addr+"\"\n  issuer = \""+issuer+"\"\n"+tlsBlock+"}\n")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	t.Cleanup(func() {
		client.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	select {
	case <-s.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("signer not ready within 10s")
	}
	return &oidcSigner{Signer: s, issuer: issuer, client: client}
}

// get fetches path under the issuer with the given method and headers.
func (o *oidcSigner) get(t *testing.T, method, path string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, o.issuer+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := o.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

// mint mints a JWT-SVID of entry "mine" for audience, as MintJWTSVIDs does.
func (o *oidcSigner) mint(t *testing.T, now time.Time, audience ...string) *minted {
	t.Helper()
	m, err := o.mintOne(testAgent, &signerpb.JWTSVIDRequest{EntryId: "mine", Audience: audience}, now)
	if err != nil {
		t.Fatalf("mintOne: %v", err)
	}
	return m
}

// verifier discovers the issuer with go-oidc, as a relying party would,
// and returns its verifier for audience at the time now returns.
func (o *oidcSigner) verifier(t *testing.T, audience string, now func() time.Time) *oidc.IDTokenVerifier {
	t.Helper()
	ctx := oidc.ClientContext(context.Background(), o.client)
	p, err := oidc.NewProvider(ctx, o.issuer)
	if err != nil {
		t.Fatalf("oidc.NewProvider(%s): %v", o.issuer, err)
	}
	return p.VerifierContext(ctx, &oidc.Config{ClientID: audience, SupportedSigningAlgs: []string{oidc.ES256}, Now: now})
}

func TestOIDCDiscoveryVerifiesJWTSVIDs(t *testing.T) {
	o := startOIDCSigner(t, "jwt_max_ttl = \"5m\"\n")
	now := time.Now()
	m := o.mint(t, now, "sts.amazonaws.com")
	good := m.token

	// The same token is still a JWT-SVID to go-spiffe: iss is an extra claim.
	svid, err := jwtsvid.ParseAndValidate(good, jwtBundle(t, o.Signer), []string{"sts.amazonaws.com"})
	if err != nil {
		t.Fatalf("go-spiffe refuses a token with iss: %v", err)
	}
	if svid.Claims["iss"] != o.issuer {
		t.Errorf("iss = %v, want %s", svid.Claims["iss"], o.issuer)
	}

	v := o.verifier(t, "sts.amazonaws.com", nil)
	tok, err := v.Verify(context.Background(), good)
	if err != nil {
		t.Fatalf("go-oidc refuses a JWT-SVID: %v", err)
	}
	if tok.Subject != "spiffe://example.org/mine" || tok.Issuer != o.issuer || !slices.Equal(tok.Audience, []string{"sts.amazonaws.com"}) {
		t.Errorf("token sub=%s iss=%s aud=%v", tok.Subject, tok.Issuer, tok.Audience)
	}

	// A key this signer never published, with the right issuer and kid form.
	stranger, err := newJWTKey(now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	unpublished, err := stranger.mint(o.issuer, jwtClaims{sub: m.id, audience: []string{"sts.amazonaws.com"}, ttl: time.Minute}, now)
	if err != nil {
		t.Fatal(err)
	}
	// A published key, another issuer: a signer without the block.
	noIss, err := o.auth.activeJWT.mint("", jwtClaims{sub: m.id, audience: []string{"sts.amazonaws.com"}, ttl: time.Minute}, now)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(good, ".")
	flip := func(s string) string {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 1
		return base64.RawURLEncoding.EncodeToString(b)
	}
	var claims map[string]any
	raw, _ := base64.RawURLEncoding.DecodeString(parts[1])
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatal(err)
	}
	claims["sub"] = "spiffe://example.org/admin"
	forged, _ := json.Marshal(claims)

	tests := []struct {
		name, token, audience string
		now                   time.Time
		want                  string // in go-oidc's error
	}{
		{name: "signature byte flipped", token: parts[0] + "." + parts[1] + "." + flip(parts[2]), audience: "sts.amazonaws.com",
			want: "failed to verify signature"},
		{name: "payload byte flipped", token: parts[0] + "." + flip(parts[1]) + "." + parts[2], audience: "sts.amazonaws.com",
			want: "failed to verify signature"},
		{name: "payload replaced", token: parts[0] + "." + base64.RawURLEncoding.EncodeToString(forged) + "." + parts[2], audience: "sts.amazonaws.com",
			want: "failed to verify signature"},
		{name: "another audience", token: good, audience: "vault", want: `expected audience "vault"`},
		{name: "expired", token: good, audience: "sts.amazonaws.com", now: m.exp.Add(time.Second), want: "token is expired"},
		{name: "key not in the JWKS", token: unpublished.token, audience: "sts.amazonaws.com", want: "failed to verify signature"},
		{name: "no iss", token: noIss.token, audience: "sts.amazonaws.com", want: "id token issued by a different provider"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var clock func() time.Time
			if !tt.now.IsZero() {
				clock = func() time.Time { return tt.now }
			}
			_, err := o.verifier(t, tt.audience, clock).Verify(context.Background(), tt.token)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Verify = %v, want an error with %q", err, tt.want)
			}
		})
	}
	t.Run("valid until exp", func(t *testing.T) {
		if _, err := o.verifier(t, "sts.amazonaws.com", func() time.Time { return m.exp.Add(-time.Second) }).Verify(context.Background(), good); err != nil {
			t.Errorf("Verify a second before exp: %v", err)
		}
	})
}

// jwksKids fetches the JWKS and returns its kids and ETag, checking each
// key is a public ES256 signing key.
func jwksKids(t *testing.T, o *oidcSigner) ([]string, string) {
	t.Helper()
	resp, body := o.get(t, http.MethodGet, oidcKeysPath)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", oidcKeysPath, resp.Status)
	}
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal([]byte(body), &set); err != nil {
		t.Fatalf("JWKS: %v\n%s", err, body)
	}
	var kids []string
	for _, k := range set.Keys {
		want := map[string]bool{"kty": true, "crv": true, "x": true, "y": true, "kid": true, "use": true, "alg": true}
		for name := range k {
			if !want[name] {
				t.Errorf("JWKS key %v has member %q", k["kid"], name)
			}
		}
		if k["kty"] != "EC" || k["crv"] != "P-256" || k["use"] != "sig" || k["alg"] != "ES256" {
			t.Errorf("JWKS key %v: kty %v crv %v use %v alg %v, want EC P-256 sig ES256", k["kid"], k["kty"], k["crv"], k["use"], k["alg"])
		}
		kids = append(kids, k["kid"].(string))
	}
	return kids, resp.Header.Get("ETag")
}

func TestOIDCJWKSFollowsRotation(t *testing.T) {
	o := startOIDCSigner(t, "jwt_max_ttl = \"12h\"\n") // ca_ttl 24h, lead 4h
	t0 := issued(o.auth.active)
	prepareAt, activateAt := t0.Add(8*time.Hour), t0.Add(12*time.Hour)
	k0 := o.auth.activeJWT.kid

	kids, etag0 := jwksKids(t, o)
	if !slices.Equal(kids, []string{k0}) {
		t.Fatalf("JWKS at start = %v, want [%s]", kids, k0)
	}
	if _, err := o.advanceCAs(prepareAt); err != nil {
		t.Fatal(err)
	}
	k1 := o.auth.nextJWT.kid
	want := []string{k0, k1}
	slices.Sort(want)
	kids, etag1 := jwksKids(t, o)
	if !slices.Equal(kids, want) {
		t.Fatalf("JWKS after the next key is published = %v, want %v (sorted by kid)", kids, want)
	}
	if etag1 == etag0 {
		t.Error("ETag unchanged although the JWKS changed")
	}
	if resp, _ := o.get(t, http.MethodGet, oidcKeysPath, "If-None-Match", etag0); resp.StatusCode != http.StatusOK {
		t.Errorf("GET with the old ETag: %s, want 200 with the new keys", resp.Status)
	}
	// Listed, yet not signing: tokens still come from k0 until half-life.
	if m := o.mint(t, prepareAt, "a"); m.kid != k0 {
		t.Errorf("token minted after publication has kid %s, want %s", m.kid, k0)
	}
	// A relying party that fetched the JWKS before the hand-over (for a
	// token of k0) verifies the first token of the next key.
	clock := prepareAt
	v := o.verifier(t, "a", func() time.Time { return clock })
	if _, err := v.Verify(context.Background(), o.mint(t, prepareAt, "a").token); err != nil {
		t.Fatalf("go-oidc refuses a token of the current key: %v", err)
	}
	clock = activateAt
	m := o.mint(t, activateAt, "a")
	if m.kid != k1 {
		t.Fatalf("token minted at half-life has kid %s, want %s", m.kid, k1)
	}
	if _, err := v.Verify(context.Background(), m.token); err != nil {
		t.Errorf("go-oidc refuses the next key's first token: %v", err)
	}
}

func TestOIDCHTTP(t *testing.T) {
	o := startOIDCSigner(t, "ca_publish_lead = \"40s\"\n")
	_, etag := jwksKids(t, o)
	discovery, doc := o.get(t, http.MethodGet, oidcConfigPath)
	if discovery.StatusCode != http.StatusOK {
		t.Fatalf("GET discovery: %s", discovery.Status)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(doc), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"issuer": o.issuer, "jwks_uri": o.issuer + "/keys",
		"id_token_signing_alg_values_supported": []any{"ES256"}, "response_types_supported": []any{"id_token"},
		"subject_types_supported": []any{"public"}, "claims_supported": []any{"sub", "aud", "exp", "iat", "iss"},
	}
	if b1, b2 := mustJSON(t, want), mustJSON(t, got); b1 != b2 {
		t.Errorf("discovery document = %s\nwant %s", b2, b1)
	}
	tests := []struct {
		name, method, path string
		hdr                []string
		code               int
		bodyHas            string
		wantHdr            map[string]string
	}{
		{name: "discovery", method: "GET", path: oidcConfigPath, code: 200, bodyHas: `"jwks_uri"`,
			wantHdr: map[string]string{"Cache-Control": "public, max-age=20", "Content-Type": "application/json", "ETag": discovery.Header.Get("ETag")}},
		{name: "keys", method: "GET", path: oidcKeysPath, code: 200, bodyHas: `"keys"`,
			wantHdr: map[string]string{"Cache-Control": "public, max-age=20", "ETag": etag}},
		{name: "HEAD keys", method: "HEAD", path: oidcKeysPath, code: 200, wantHdr: map[string]string{"ETag": etag}},
		{name: "If-None-Match", method: "GET", path: oidcKeysPath, hdr: []string{"If-None-Match", etag}, code: 304,
			wantHdr: map[string]string{"ETag": etag, "Cache-Control": "public, max-age=20"}},
		{name: "If-None-Match weak, in a list", method: "GET", path: oidcKeysPath, hdr: []string{"If-None-Match", `"x", W/` + etag}, code: 304},
		{name: "If-None-Match *", method: "GET", path: oidcConfigPath, hdr: []string{"If-None-Match", "*"}, code: 304},
		{name: "If-None-Match other", method: "GET", path: oidcKeysPath, hdr: []string{"If-None-Match", `"other"`}, code: 200, bodyHas: `"keys"`},
		{name: "discovery ETag on keys", method: "GET", path: oidcKeysPath, hdr: []string{"If-None-Match", discovery.Header.Get("ETag")}, code: 200},
		{name: "POST", method: "POST", path: oidcKeysPath, code: 405, wantHdr: map[string]string{"Allow": "GET, HEAD"}},
		{name: "DELETE", method: "DELETE", path: oidcConfigPath, code: 405},
		{name: "unknown path", method: "GET", path: "/metrics", code: 404},
		{name: "root", method: "GET", path: "/", code: 404},
		{name: "trailing slash", method: "GET", path: oidcKeysPath + "/", code: 404},
		{name: "POST to an unknown path", method: "POST", path: "/x", code: 404},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := o.get(t, tt.method, tt.path, tt.hdr...)
			if resp.StatusCode != tt.code || !strings.Contains(body, tt.bodyHas) {
				t.Fatalf("%s %s: %s, want %d with %q\n%s", tt.method, tt.path, resp.Status, tt.code, tt.bodyHas, body)
			}
			for k, v := range tt.wantHdr {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if (tt.method == "HEAD" || tt.code == 304) && body != "" {
				t.Errorf("%s %s: %d with a body", tt.method, tt.path, tt.code)
			}
		})
	}
}

func TestOIDCMaxAge(t *testing.T) {
	tests := []struct{ lead, want time.Duration }{
		{time.Second, 10 * time.Second},
		{20 * time.Second, 10 * time.Second},
		{40 * time.Second, 20 * time.Second},
		{8 * time.Minute, 4 * time.Minute},
		{4 * time.Hour, 5 * time.Minute},
	}
	for _, tt := range tests {
		if got := oidcMaxAge(tt.lead); got != tt.want {
			t.Errorf("oidcMaxAge(%v) = %v, want %v", tt.lead, got, tt.want)
		}
		if got := oidcMaxAge(tt.lead); tt.lead >= 20*time.Second && got > tt.lead/2 {
			t.Errorf("oidcMaxAge(%v) = %v: a cache could miss a key published %v before it signs", tt.lead, got, tt.lead)
		}
	}
}

// TestOIDCJWKSIsTheTierUnion: the JWKS is the bundle agents are pushed,
// the union of every replica's keys, and two replicas holding the same
// keys serve the same bytes under the same ETag, whatever their order.
func TestOIDCJWKSIsTheTierUnion(t *testing.T) {
	o := startOIDCSigner(t, "")
	peer := testPublicKey(t, time.Now().Add(time.Hour))
	own := o.auth.activeJWT.kid
	o.setPeers(nil, []publicJWTKey{peer})
	kids, etag := jwksKids(t, o)
	want := []string{own, peer.kid}
	slices.Sort(want)
	if !slices.Equal(kids, want) {
		t.Fatalf("JWKS with a peer replica = %v, want the union %v", kids, want)
	}
	// A peer's own token verifies here, as it does at the agents.
	peerKey, err := newJWTKey(time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	o.setPeers(nil, []publicJWTKey{peer, peerKey.public()})
	tok, err := peerKey.mint(o.issuer, jwtClaims{sub: testID, audience: []string{"a"}, ttl: time.Minute}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.verifier(t, "a", nil).Verify(context.Background(), tok.token); err != nil {
		t.Errorf("go-oidc refuses a token of another replica's key: %v", err)
	}

	// The other replica's view: the same keys in another order.
	s := o.Signer
	s.mu.Lock()
	mine := s.agentBundle
	s.mu.Unlock()
	theirs := &signerpb.Bundle{JwtAuthorities: slices.Clone(mine.GetJwtAuthorities())}
	slices.Reverse(theirs.JwtAuthorities)
	h1, err := newOIDCHandler(o.issuer, time.Hour, func() *signerpb.Bundle { return mine }, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	h2, err := newOIDCHandler(o.issuer, time.Hour, func() *signerpb.Bundle { return theirs }, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	if d1, d2 := h1.currentJWKS(), h2.currentJWKS(); string(d1.body) != string(d2.body) || d1.etag != d2.etag {
		t.Errorf("two replicas with the same keys serve different JWKS:\n%s\n%s", d1.body, d2.body)
	}
	if _, etag2 := jwksKids(t, o); etag2 == etag {
		t.Error("ETag unchanged after a peer key joined")
	}
}

// TestNoIssWithoutOIDC: without oidc_discovery, JWT-SVIDs carry no iss,
// as before the block existed, and nothing listens.
func TestNoIssWithoutOIDC(t *testing.T) {
	s := newJWTTestSigner(t, t.TempDir(), "")
	m, err := s.mintOne(testAgent, &signerpb.JWTSVIDRequest{EntryId: "mine", Audience: []string{"a"}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	svid, err := jwtsvid.ParseAndValidate(m.token, jwtBundle(t, s), []string{"a"})
	if err != nil {
		t.Fatal(err)
	}
	if iss, ok := svid.Claims["iss"]; ok {
		t.Errorf("iss = %v without an oidc_discovery block", iss)
	}
	if ln, err := s.listenOIDC(); ln != nil || err != nil {
		t.Errorf("listenOIDC = %v, %v without the block, want nothing", ln, err)
	}
}

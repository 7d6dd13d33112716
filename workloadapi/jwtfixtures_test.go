package workloadapi

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

// jwtIssuer signs real JWT-SVIDs with an ES256 key published under kid in
// td's JWT bundle.
type jwtIssuer struct {
	key    *ecdsa.PrivateKey
	kid    string
	bundle *jwtbundle.Bundle
}

func newJWTIssuer(t testing.TB, kid string) *jwtIssuer {
	t.Helper()
	key := newECKey(t)
	b := jwtbundle.New(td)
	if err := b.AddJWTAuthority(kid, key.Public()); err != nil {
		t.Fatal(err)
	}
	return &jwtIssuer{key: key, kid: kid, bundle: b}
}

func newECKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func (i *jwtIssuer) set() *jwtbundle.Set { return jwtbundle.NewSet(i.bundle) }

// bundlesResponse is the JWKS of i's bundle as the Workload API sends it.
func (i *jwtIssuer) bundlesResponse(t testing.TB) *workload.JWTBundlesResponse {
	t.Helper()
	jwks, err := i.bundle.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return &workload.JWTBundlesResponse{Bundles: map[string][]byte{td.IDString(): jwks}}
}

// mint signs claims with i's key and kid.
func (i *jwtIssuer) mint(t testing.TB, claims map[string]any) string {
	t.Helper()
	return signJWT(t, jose.ES256, i.key, i.kid, claims)
}

// signJWT signs claims with key under alg, naming kid in the header
// (none when empty).
func signJWT(t testing.TB, alg jose.SignatureAlgorithm, key any, kid string, claims map[string]any) string {
	t.Helper()
	tok, err := sign(alg, key, kid, claims)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func sign(alg jose.SignatureAlgorithm, key any, kid string, claims map[string]any) (string, error) {
	sk := jose.SigningKey{Algorithm: alg, Key: key}
	if kid != "" {
		sk.Key = jose.JSONWebKey{Key: key, KeyID: kid}
	}
	signer, err := jose.NewSigner(sk, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", err
	}
	return jwt.Signed(signer).Claims(claims).Serialize()
}

// unsignedJWT is an alg "none" token for claims.
func unsignedJWT(t testing.TB, kid string, claims map[string]any) string {
	t.Helper()
	return encodeSegment(t, map[string]any{"alg": "none", "kid": kid, "typ": "JWT"}) + "." + encodeSegment(t, claims) + "."
}

func encodeSegment(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// publicKeyBytes is the DER of key's public half, what an attacker signs
// HS256 tokens with in the key confusion attack.
func publicKeyBytes(t testing.TB, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// jwtClaims are the claims of a fresh JWT-SVID for path and aud, as at now.
func jwtClaims(now time.Time, path string, aud ...string) map[string]any {
	return map[string]any{
		"sub": td.IDString() + path,
		"aud": aud,
		"iat": now.Unix(),
		"exp": now.Add(5 * time.Minute).Unix(),
	}
}

// with returns a copy of claims with k set to v (deleted when v is nil).
func with(claims map[string]any, kv ...any) map[string]any {
	out := make(map[string]any, len(claims))
	for k, v := range claims {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(out, kv[i].(string))
		} else {
			out[kv[i].(string)] = kv[i+1]
		}
	}
	return out
}

// tamperSignature flips one bit in the token's signature.
func tamperSignature(t testing.TB, tok string) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		t.Fatal(err)
	}
	sig[len(sig)/2] ^= 0x01
	parts[2] = base64.RawURLEncoding.EncodeToString(sig)
	return strings.Join(parts, ".")
}

// replacePayload keeps the token's header and signature around new claims.
func replacePayload(t testing.TB, tok string, claims map[string]any) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	parts[1] = encodeSegment(t, claims)
	return strings.Join(parts, ".")
}

// fakeJWTSource mints real tokens for the SPIFFE IDs keyed by selector,
// and serves a bundle that can be replaced.
type fakeJWTSource struct {
	iss *jwtIssuer
	err error // returned by JWTSVIDs when set

	mu      sync.Mutex
	ids     map[string][]string // selector → SPIFFE IDs
	bundles *workload.JWTBundlesResponse
	set     *jwtbundle.Set
	fed     map[string]fakeJWTFed // by selector: what callers whose entries federate get
	changed chan struct{}
}

// fakeJWTFed is the JWT bundles of a caller whose entries federate.
type fakeJWTFed struct {
	resp *workload.JWTBundlesResponse
	set  *jwtbundle.Set
}

func newFakeJWTSource(t testing.TB, iss *jwtIssuer) *fakeJWTSource {
	return &fakeJWTSource{
		iss: iss, ids: map[string][]string{},
		bundles: iss.bundlesResponse(t), set: iss.set(), changed: make(chan struct{}),
	}
}

func (s *fakeJWTSource) entitle(selector string, ids ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ids[selector] = append(s.ids[selector], ids...)
}

func (s *fakeJWTSource) JWTSVIDs(_ context.Context, selectors []string, spiffeID string, audience []string) ([]*workload.JWTSVID, error) {
	if s.err != nil {
		return nil, s.err
	}
	s.mu.Lock()
	var ids []string
	for _, sel := range selectors {
		for _, id := range s.ids[sel] {
			if (spiffeID == "" || id == spiffeID) && !slices.Contains(ids, id) {
				ids = append(ids, id)
			}
		}
	}
	s.mu.Unlock()
	if len(ids) == 0 {
		return nil, fmt.Errorf("%w for selectors %v", ErrNotEntitled, selectors)
	}
	now := time.Now()
	out := make([]*workload.JWTSVID, 0, len(ids))
	for _, id := range ids {
		c := jwtClaims(now, "", audience...)
		c["sub"] = id
		if parent, _, ok := strings.Cut(id, "/action/"); ok {
			// As the signer mints an action identity.
			c["act"], c["jti"] = map[string]any{"sub": parent}, fmt.Sprintf("jti-%d", time.Now().UnixNano())
		}
		tok, err := sign(jose.ES256, s.iss.key, s.iss.kid, c)
		if err != nil {
			return nil, err
		}
		out = append(out, &workload.JWTSVID{SpiffeId: id, Svid: tok})
	}
	return out, nil
}

func (s *fakeJWTSource) JWTBundlesResponse(selectors []string) (*workload.JWTBundlesResponse, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sel := range selectors {
		if f, ok := s.fed[sel]; ok {
			return f.resp, s.changed
		}
	}
	return s.bundles, s.changed
}

func (s *fakeJWTSource) JWTBundles(selectors []string) *jwtbundle.Set {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sel := range selectors {
		if f, ok := s.fed[sel]; ok {
			return f.set
		}
	}
	return s.set
}

// federate gives callers with selector these JWT bundles and wakes every
// stream.
func (s *fakeJWTSource) federate(selector string, resp *workload.JWTBundlesResponse, set *jwtbundle.Set) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fed == nil {
		s.fed = map[string]fakeJWTFed{}
	}
	s.fed[selector] = fakeJWTFed{resp, set}
	close(s.changed)
	s.changed = make(chan struct{})
}

// setBundles replaces the bundles and wakes every stream.
func (s *fakeJWTSource) setBundles(resp *workload.JWTBundlesResponse, set *jwtbundle.Set) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bundles, s.set = resp, set
	close(s.changed)
	s.changed = make(chan struct{})
}

package workloadapi

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// FuzzValidateJWTSVID feeds the validation path mutations of valid and
// hostile tokens. It must never panic, and must never accept a token
// unless the bundle's one key signed exactly its header and payload: that
// is checked here with crypto/ecdsa alone, not with go-jose.
func FuzzValidateJWTSVID(f *testing.F) {
	iss := newJWTIssuer(f, "k1")
	set := iss.set()
	now := time.Unix(1_800_000_000, 0)
	good := jwtClaims(now, "/web", "a", "b")
	valid := iss.mint(f, good)
	for _, seed := range []struct{ token, audience string }{
		{valid, "a"},
		{iss.mint(f, with(good, "nbf", now.Unix(), "extra", map[string]any{"n": 1.5, "l": []any{true, nil}})), "b"},
		{iss.mint(f, with(good, "aud", "a")), "a"},
		{iss.mint(f, with(good, "sub", "spiffe://evil.org/web")), "a"},
		{tamperSignature(f, valid), "a"},
		{replacePayload(f, valid, with(good, "sub", "spiffe://example.org/admin")), "a"},
		{unsignedJWT(f, "k1", good), "a"},
		{signJWT(f, jose.HS256, publicKeyBytes(f, iss.key), "k1", good), "a"},
		{signJWT(f, jose.ES256, newECKey(f), "k2", good), "a"},
		{"a.b.c", "a"},
		{"", ""},
	} {
		f.Add(seed.token, seed.audience)
	}
	pub := &iss.key.PublicKey
	f.Fuzz(func(t *testing.T, token, audience string) {
		id, claims, err := validateJWTSVID(token, audience, fromSet(set), now)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("refusal without a reason")
			}
			return
		}
		if !signedBy(pub, token) {
			t.Fatalf("accepted a token %q that the bundle's key did not sign", token)
		}
		if claims["sub"] != id.String() {
			t.Fatalf("accepted SPIFFE ID %s, but the signed sub is %v", id, claims["sub"])
		}
	})
}

// signedBy says whether token's third part is an ES256 signature by pub of
// its first two parts.
func signedBy(pub *ecdsa.PublicKey, token string) bool {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return false
	}
	sig, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[2], "="))
	if err != nil || len(sig) != 64 {
		return false
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	return ecdsa.Verify(pub, digest[:], r, s)
}

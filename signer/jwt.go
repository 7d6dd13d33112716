package signer

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrNoAudience is returned when a JWT-SVID is asked for without audience:
// a token valid for anyone is a bearer secret for everyone.
var ErrNoAudience = errors.New("a JWT-SVID needs at least one audience")

// jwtKey is a JWT-SVID signing key of one CA generation: created with the
// generation's CA, published with it, signing while it signs. The private
// half lives in this process's memory only.
type jwtKey struct {
	kid    string
	priv   *ecdsa.PrivateKey
	pubDER []byte // PKIX, for the bundle
	// notAfter is the generation's CA NotAfter. The key signs until half
	// the CA's lifetime and a token lives at most jwt_max_ttl <= ca_ttl/2,
	// so no token it signs expires later: it bounds how long the key must
	// stay published.
	notAfter time.Time
	signer   jose.Signer
}

// newJWTKey creates a P-256 signing key with a fresh random key ID.
func newJWTKey(notAfter time.Time) (*jwtKey, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate JWT key: %w", err)
	}
	kid, err := newKeyID()
	if err != nil {
		return nil, err
	}
	return jwtKeyFrom(priv, kid, notAfter)
}

// jwtKeyFrom makes the signing key of priv, known as kid (a new key, or
// one restored from key storage).
func jwtKeyFrom(priv *ecdsa.PrivateKey, kid string, notAfter time.Time) (*jwtKey, error) {
	der, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		return nil, fmt.Errorf("encode JWT key: %w", err)
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: priv, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("JWT signer: %w", err)
	}
	return &jwtKey{kid: kid, priv: priv, pubDER: der, notAfter: notAfter, signer: sig}, nil
}

// newKeyID draws 24 random bytes: 32 base64url characters, unguessable
// and unique across restarts without any coordination.
func newKeyID() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate key ID: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// jwtClaims is what one JWT-SVID asserts.
type jwtClaims struct {
	sub      spiffeid.ID
	audience []string
	ttl      time.Duration
	// act, when set, is the RFC 8693 actor of an action token: the
	// entry's own SPIFFE ID, on whose behalf sub acts.
	act spiffeid.ID
}

// signedJWT is a minted JWT-SVID and the facts about it the caller and
// the audit line need.
type signedJWT struct {
	token, kid, jti string
	exp             time.Time
}

// jtiBytes is the size of a token ID: 128 random bits cannot collide in
// any number of tokens a trust domain will ever mint.
const jtiBytes = 16

// newJTI draws a fresh token ID, base64url without padding.
func newJTI() (string, error) {
	b := make([]byte, jtiBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate jti: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// mint signs a JWT-SVID of c with a fresh jti, issued at now and
// expiring c.ttl later, but never after the key's notAfter. Times are
// whole seconds, as the claims carry them. issuer, when not empty, is
// the iss claim (the oidc_discovery issuer); the JWT-SVID spec neither
// needs nor forbids it. Every token has a jti: it is what a revocation
// and the single-use check of action tokens name.
func (k *jwtKey) mint(issuer string, c jwtClaims, now time.Time) (signedJWT, error) {
	if len(c.audience) == 0 {
		return signedJWT{}, ErrNoAudience
	}
	jti, err := newJTI()
	if err != nil {
		return signedJWT{}, err
	}
	iat := now.Truncate(time.Second)
	exp := iat.Add(c.ttl.Truncate(time.Second))
	if exp.After(k.notAfter) {
		exp = k.notAfter.Truncate(time.Second)
	}
	b := jwt.Signed(k.signer).Claims(jwt.Claims{
		Issuer:   issuer, // omitted when empty
		Subject:  c.sub.String(),
		Audience: jwt.Audience(c.audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(iat),
		ID:       jti,
	})
	if !c.act.IsZero() {
		b = b.Claims(map[string]any{"act": map[string]string{"sub": c.act.String()}})
	}
	tok, err := b.Serialize()
	if err != nil {
		return signedJWT{}, fmt.Errorf("sign JWT-SVID for %s: %w", c.sub, err)
	}
	return signedJWT{token: tok, kid: k.kid, jti: jti, exp: exp}, nil
}

// publicJWTKey is a JWT key as published: in the bundle, in state_dir.
type publicJWTKey struct {
	kid    string
	pubDER []byte
	pub    *ecdsa.PublicKey
	// keepUntil is when the key may leave the bundle: the latest expiry
	// of anything it signed (or may still sign).
	keepUntil time.Time
	// bound is the latest expiry anything it signed could have. The
	// bundle carries this one: it does not move when signing hands over,
	// so a hand-over is not a bundle change.
	bound time.Time
}

func (k *jwtKey) public() publicJWTKey {
	return publicJWTKey{kid: k.kid, pubDER: k.pubDER, pub: &k.priv.PublicKey, keepUntil: k.notAfter, bound: k.notAfter}
}

// jwtAuthorities is keys in the form the agents receive.
func jwtAuthorities(keys []publicJWTKey) []*signerpb.JWTAuthority {
	out := make([]*signerpb.JWTAuthority, 0, len(keys))
	for _, k := range keys {
		out = append(out, &signerpb.JWTAuthority{KeyId: k.kid, PublicKey: k.pubDER, ExpiresAt: k.bound.Unix()})
	}
	return out
}

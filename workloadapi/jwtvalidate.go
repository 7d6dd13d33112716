package workloadapi

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// JWTLeeway is the clock skew ValidateJWTSVID tolerates on exp, nbf and
// iat. Tokens cross hosts whose clocks NTP keeps far closer than this; 30 s
// covers a host whose sync lags, and stretches a 5 min token's life by a
// tenth at most. go-spiffe's own ParseAndValidate allows 60 s, so a token
// this agent accepts is never one a go-spiffe relying party refuses for time.
const JWTLeeway = 30 * time.Second

// maxJWTSize bounds the token ValidateJWTSVID will look at: JWT-SVIDs are a
// few hundred bytes, and anything far larger is garbage or an attempt to
// make the agent parse megabytes.
const maxJWTSize = 16 << 10

// jwtAlgorithms are the signature algorithms a JWT-SVID may use, per the
// JWT-SVID spec: asymmetric only. "none" and the HMAC family are refused
// by name before go-jose sees the token (an HS256 token "signed" with a
// bundle's public key bytes is the classic confusion attack).
var jwtAlgorithms = []jose.SignatureAlgorithm{
	jose.ES256, jose.ES384, jose.ES512,
	jose.RS256, jose.RS384, jose.RS512,
	jose.PS256, jose.PS384, jose.PS512,
}

// jwtBundleFor returns the JWT bundle of a trust domain, or nil and why
// there is none for this caller ("" for no more to say).
type jwtBundleFor func(spiffeid.TrustDomain) (*jwtbundle.Bundle, string)

// fromSet looks bundles up in a set.
func fromSet(set *jwtbundle.Set) jwtBundleFor {
	return func(td spiffeid.TrustDomain) (*jwtbundle.Bundle, string) {
		if set != nil {
			if b, ok := set.Get(td); ok {
				return b, ""
			}
		}
		return nil, ""
	}
}

// validateJWTSVID checks token as a JWT-SVID for audience at time now:
// a compact JWS with an allowed algorithm, signed by the key its kid names
// in the bundle of its subject's trust domain, not expired, not used before
// its time (both within JWTLeeway), and meant for audience. It returns the
// subject and every claim. Each error names one reason, fit for the caller
// (the token itself is never quoted).
func validateJWTSVID(token, audience string, bundleFor jwtBundleFor, now time.Time) (spiffeid.ID, map[string]any, error) {
	if err := checkJWTHeader(token); err != nil {
		return spiffeid.ID{}, nil, err
	}
	tok, err := jwt.ParseSigned(token, jwtAlgorithms)
	if err != nil {
		return spiffeid.ID{}, nil, fmt.Errorf("malformed token: %w", err)
	}
	kid := tok.Headers[0].KeyID
	if kid == "" {
		return spiffeid.ID{}, nil, fmt.Errorf("token header has no kid")
	}
	// The subject says which trust domain's keys to try; nothing from the
	// unverified claims is believed until the signature checks out.
	var claims jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
		return spiffeid.ID{}, nil, fmt.Errorf("malformed token claims: %w", err)
	}
	if claims.Subject == "" {
		return spiffeid.ID{}, nil, fmt.Errorf("token has no sub claim")
	}
	id, err := spiffeid.FromString(claims.Subject)
	if err != nil {
		return spiffeid.ID{}, nil, fmt.Errorf("sub %.200q is not a SPIFFE ID: %w", claims.Subject, err)
	}
	bundle, why := bundleFor(id.TrustDomain())
	if bundle == nil {
		if why != "" {
			why = ": " + why
		}
		return spiffeid.ID{}, nil, fmt.Errorf("no JWT bundle for trust domain %q of sub %s%s", id.TrustDomain().Name(), id, why)
	}
	key, ok := bundle.FindJWTAuthority(kid)
	if !ok {
		return spiffeid.ID{}, nil, fmt.Errorf("unknown kid %.100q: not in the JWT bundle of trust domain %q", kid, id.TrustDomain().Name())
	}
	all := map[string]any{}
	if err := tok.Claims(key, &all); err != nil {
		return spiffeid.ID{}, nil, fmt.Errorf("signature does not verify with key %q of trust domain %q: %w", kid, id.TrustDomain().Name(), err)
	}
	if err := checkJWTClaims(claims, audience, now); err != nil {
		return spiffeid.ID{}, nil, err
	}
	return id, all, nil
}

// checkJWTHeader refuses what is not a compact JWS, or names an algorithm
// outside jwtAlgorithms, with a message that says which; go-jose alone
// would only say it could not parse.
func checkJWTHeader(token string) error {
	if len(token) > maxJWTSize {
		return fmt.Errorf("token is %d bytes, more than the %d a JWT-SVID may be", len(token), maxJWTSize)
	}
	if strings.Count(token, ".") != 2 {
		return fmt.Errorf("malformed token: not a JWS in compact serialization (three dot-separated parts)")
	}
	raw, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(token[:strings.IndexByte(token, '.')], "="))
	if err != nil {
		return fmt.Errorf("malformed token header: not base64url: %w", err)
	}
	var hdr struct {
		Alg string `json:"alg"`
		Typ any    `json:"typ"`
	}
	if err := json.Unmarshal(raw, &hdr); err != nil {
		return fmt.Errorf("malformed token header: not a JSON object with a string alg")
	}
	switch alg := hdr.Alg; {
	case alg == "":
		return fmt.Errorf("token header has no alg")
	case strings.EqualFold(alg, "none"):
		return fmt.Errorf(`algorithm "none" is not allowed: the token is unsigned`)
	case strings.HasPrefix(strings.ToUpper(alg), "HS"):
		return fmt.Errorf("algorithm %.20q is not allowed: HMAC tokens are never accepted, only ES, RS and PS algorithms", alg)
	case !allowedJWTAlgorithm(alg):
		return fmt.Errorf("algorithm %.20q is not allowed: want one of ES256, ES384, ES512, RS256, RS384, RS512, PS256, PS384, PS512", alg)
	}
	// As the JWT-SVID spec says: typ, when present, is JWT or JOSE.
	if hdr.Typ != nil && hdr.Typ != "JWT" && hdr.Typ != "JOSE" {
		return fmt.Errorf("token header typ %.20q is not JWT or JOSE", fmt.Sprint(hdr.Typ))
	}
	return nil
}

func allowedJWTAlgorithm(alg string) bool {
	for _, a := range jwtAlgorithms {
		if string(a) == alg {
			return true
		}
	}
	return false
}

// checkJWTClaims checks the registered claims of a token whose signature
// has been verified.
func checkJWTClaims(c jwt.Claims, audience string, now time.Time) error {
	if c.Expiry == nil {
		return fmt.Errorf("token has no exp claim")
	}
	if exp := c.Expiry.Time(); now.Add(-JWTLeeway).After(exp) {
		return fmt.Errorf("token expired at %s (leeway %s)", exp.UTC().Format(time.RFC3339), JWTLeeway)
	}
	if c.NotBefore != nil {
		if nbf := c.NotBefore.Time(); now.Add(JWTLeeway).Before(nbf) {
			return fmt.Errorf("token not valid yet: nbf is %s (leeway %s)", nbf.UTC().Format(time.RFC3339), JWTLeeway)
		}
	}
	if c.IssuedAt != nil {
		if iat := c.IssuedAt.Time(); now.Add(JWTLeeway).Before(iat) {
			return fmt.Errorf("token not valid yet: iat is in the future, %s (leeway %s)", iat.UTC().Format(time.RFC3339), JWTLeeway)
		}
	}
	if len(c.Audience) == 0 {
		return fmt.Errorf("token has no aud claim")
	}
	if !c.Audience.Contains(audience) {
		return fmt.Errorf("audience %.200q is not among the token's %.200q", audience, []string(c.Audience))
	}
	return nil
}

package signer

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// JWTStateFile is the file in state_dir where the signer keeps the public
// halves of its JWT signing keys, so that a restarted signer still
// publishes the keys of tokens that are yet to expire. It is a JWKS
// (RFC 7517) whose keys carry "use": "jwt-svid" and one extra member,
// "keep_until" (RFC 3339): when the key may leave the bundle. No private
// key is ever written.
const JWTStateFile = "jwt-keys.json"

// ErrBadJWTState is returned by New when state_dir's JWT key file cannot
// be used. The signer refuses to start rather than drop keys that may
// still vouch for live tokens: fix or remove the file named in the error.
var ErrBadJWTState = errors.New("unusable JWT key state file")

// jwtUse is the JWK "use" of a JWT-SVID signing key in a SPIFFE bundle.
const jwtUse = "jwt-svid"

type jwtStateDoc struct {
	Keys []json.RawMessage `json:"keys"`
}

// jwtStateExtra is the member a JWK in the state file carries beyond the
// JWK itself.
type jwtStateExtra struct {
	KeepUntil *time.Time `json:"keep_until"`
}

// loadJWTState reads the JWT keys an earlier run kept in dir. A missing
// file (first start, or an upgrade from a signer without JWT keys) gives
// none; anything but P-256 public keys with a key ID and a keep-until
// time is an error naming the file and the key.
func loadJWTState(dir string) ([]publicJWTKey, error) {
	data, path, err := readState(dir, JWTStateFile)
	if err != nil || data == nil {
		return nil, wrapErr("read JWT key state", err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w %s: %s", ErrBadJWTState, path, fmt.Sprintf(format, args...))
	}
	var doc jwtStateDoc
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil || dec.More() {
		// The decoder's message may quote the file: say only where.
		return nil, bad("not a JSON key set (offset %d)", dec.InputOffset())
	}
	var keys []publicJWTKey
	seen := make(map[string]bool)
	for i, raw := range doc.Keys {
		n := i + 1
		var jwk jose.JSONWebKey
		if err := jwk.UnmarshalJSON(raw); err != nil {
			return nil, bad("key %d: not a JWK", n)
		}
		// Only the key ID is named from here on: it is public, unlike
		// whatever else a broken file might hold.
		if !jwk.IsPublic() {
			return nil, bad("key %d holds a private key", n)
		}
		pub, ok := jwk.Key.(*ecdsa.PublicKey)
		if !ok || pub.Curve != elliptic.P256() {
			return nil, bad("key %d (kid %q) is not a P-256 public key", n, jwk.KeyID)
		}
		if jwk.KeyID == "" || seen[jwk.KeyID] {
			return nil, bad("key %d: missing or repeated kid %q", n, jwk.KeyID)
		}
		if jwk.Use != jwtUse {
			return nil, bad("key %d (kid %q) has use %q, want %q", n, jwk.KeyID, jwk.Use, jwtUse)
		}
		var extra jwtStateExtra
		if err := json.Unmarshal(raw, &extra); err != nil || extra.KeepUntil == nil {
			return nil, bad("key %d (kid %q): missing or bad keep_until", n, jwk.KeyID)
		}
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return nil, bad("key %d (kid %q): %v", n, jwk.KeyID, err)
		}
		seen[jwk.KeyID] = true
		keys = append(keys, publicJWTKey{kid: jwk.KeyID, pubDER: der, pub: pub, keepUntil: *extra.KeepUntil, bound: *extra.KeepUntil})
	}
	return keys, nil
}

// marshalJWKS encodes keys as a JWKS with "use": "jwt-svid", adding
// extra(key) members to each when extra is not nil.
func marshalJWKS(keys []publicJWTKey, extra func(publicJWTKey) map[string]any) ([]byte, error) {
	doc := jwtStateDoc{Keys: make([]json.RawMessage, 0, len(keys))}
	for _, k := range keys {
		b, err := jose.JSONWebKey{Key: k.pub, KeyID: k.kid, Use: jwtUse, Algorithm: string(jose.ES256)}.MarshalJSON()
		if err != nil {
			return nil, fmt.Errorf("encode JWT key %s: %w", k.kid, err)
		}
		if extra != nil {
			m := make(map[string]any)
			if err := json.Unmarshal(b, &m); err != nil {
				return nil, fmt.Errorf("encode JWT key %s: %w", k.kid, err)
			}
			for name, v := range extra(k) {
				m[name] = v
			}
			if b, err = json.Marshal(m); err != nil {
				return nil, fmt.Errorf("encode JWT key %s: %w", k.kid, err)
			}
		}
		doc.Keys = append(doc.Keys, b)
	}
	return json.MarshalIndent(doc, "", "  ")
}

// saveJWTState keeps keys (public halves only) in dir, atomically.
func saveJWTState(dir string, keys []publicJWTKey) error {
	data, err := marshalJWKS(keys, func(k publicJWTKey) map[string]any {
		return map[string]any{"keep_until": k.keepUntil.UTC().Format(time.RFC3339Nano)}
	})
	if err != nil {
		return fmt.Errorf("save JWT key state: %w", err)
	}
	if err := writeAtomic(filepath.Join(dir, JWTStateFile), append(data, '\n')); err != nil {
		return fmt.Errorf("save JWT key state: %w", err)
	}
	return nil
}

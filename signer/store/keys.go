package store

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
)

// Kinds of records: the first path element under the prefix.
const (
	kindPolicy   = "policy"
	kindReplicas = "replicas"
	kindAlive    = "alive"
	kindRevoked  = "revoked"
	kindNodes    = "nodes"
	kindTokens   = "tokenrevoked"
)

// maxNameLen bounds a replica name: it travels in keys, logs and the
// node registry.
const maxNameLen = 128

// key is the etcd key of a record; name is "" for the policy.
func (s *Store) key(kind, name string) string {
	if kind == kindPolicy {
		return s.root + kindPolicy
	}
	return s.root + kind + "/" + name
}

// split is key's inverse: ok is false for a key that fits no kind of
// record (another tool's key under our prefix, or a malformed name).
func (s *Store) split(key string) (kind, name string, ok bool) {
	rel, found := strings.CutPrefix(key, s.root)
	if !found {
		return "", "", false
	}
	if rel == kindPolicy {
		return kindPolicy, "", true
	}
	kind, name, _ = strings.Cut(rel, "/")
	switch kind {
	case kindReplicas, kindAlive:
		return kind, name, checkName(name) == nil
	case kindRevoked, kindNodes:
		return kind, name, checkEK(name) == nil
	case kindTokens:
		return kind, name, checkTokenName(name) == nil
	}
	return "", "", false
}

// checkName accepts a replica name that is one plain path element.
func checkName(name string) error {
	if name == "" || len(name) > maxNameLen || strings.IndexFunc(name, func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || strings.ContainsRune("._-", r))
	}) >= 0 || name == "." || name == ".." {
		return fmt.Errorf("replica name %q: use 1 to %d letters, digits, '.', '_' and '-': %w", name, maxNameLen, ErrInvalid)
	}
	return nil
}

// checkEK accepts an EK SHA-256 as the signer writes it: 64 lowercase hex
// digits. Anything else would be a second key for the same node.
func checkEK(ek string) error {
	if len(ek) != 64 || strings.IndexFunc(ek, func(r rune) bool {
		return !('0' <= r && r <= '9' || 'a' <= r && r <= 'f')
	}) >= 0 {
		return fmt.Errorf("EK SHA-256 %q: want 64 lowercase hex digits: %w", ek, ErrInvalid)
	}
	return nil
}

// encode is a record's JSON, refused above limit.
func encode(v any, limit int) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("encode record: %w", err)
	}
	if len(b) > limit {
		return "", fmt.Errorf("record is %d bytes, over the limit of %d: %w", len(b), limit, ErrInvalid)
	}
	return string(b), nil
}

// decode reads a record written by encode, refusing one above limit before
// parsing it.
func decode(b []byte, limit int, v any) error {
	if len(b) > limit {
		return fmt.Errorf("record is %d bytes, over the limit of %d", len(b), limit)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode record: %w", err)
	}
	return nil
}

// TokenRevocationName is the key name of a token revocation: "t-" and
// the jti, or "i-" and the SPIFFE ID in unpadded base64url (a key segment
// holds no '/').
func TokenRevocationName(jti, spiffeID string) string {
	if jti != "" {
		return "t-" + jti
	}
	return "i-" + base64.RawURLEncoding.EncodeToString([]byte(spiffeID))
}

// checkTokenName accepts what TokenRevocationName makes.
func checkTokenName(name string) error {
	if len(name) < 3 || len(name) > 4096 || (name[:2] != "t-" && name[:2] != "i-") || strings.IndexFunc(name[2:], func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '-' || r == '_')
	}) >= 0 {
		return fmt.Errorf("token revocation name %q: %w", name, ErrInvalid)
	}
	return nil
}

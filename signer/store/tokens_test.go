package store

import (
	"errors"
	"testing"
	"time"
)

// TestTokenRevocations: a jti is revoked once (ErrExists the second
// time), a SPIFFE ID's revocation replaces the earlier one, every store's
// watch sees them, and etcd drops each at its expiry (its lease), so the
// watch drops it too with no replica writing anything. Bad input is
// refused and writes nothing.
func TestTokenRevocations(t *testing.T) {
	c := cluster(t)
	a, b := open(t, c.Endpoints(), "/lanyard/tok"), open(t, c.Endpoints(), "/lanyard/tok")
	f := follow(t, b.Store)
	f.waitFor(t, "b's first state", func(State) bool { return true })

	now := time.Now()
	jti := TokenRevocation{JTI: "abcDEF_-1", Reason: "leaked", At: now, ExpiresAt: now.Add(3 * time.Second)}
	if err := a.RevokeToken(ctx(t), jti); err != nil {
		t.Fatalf("RevokeToken(jti): %v", err)
	}
	if err := a.RevokeToken(ctx(t), jti); !errors.Is(err, ErrExists) {
		t.Errorf("the same jti again = %v, want ErrExists", err)
	}
	id := TokenRevocation{SPIFFEID: "spiffe://example.org/web", IssuedBefore: now, Reason: "one", At: now, ExpiresAt: now.Add(time.Hour)}
	if err := a.RevokeToken(ctx(t), id); err != nil {
		t.Fatalf("RevokeToken(id): %v", err)
	}
	id.Reason, id.IssuedBefore = "two", now.Add(time.Second)
	if err := a.RevokeToken(ctx(t), id); err != nil {
		t.Fatalf("RevokeToken(id) again: %v", err)
	}
	idName := TokenRevocationName("", id.SPIFFEID)
	f.waitFor(t, "both revocations in b's state, the ID's replaced", func(st State) bool {
		return len(st.TokenRevoked) == 2 && st.TokenRevoked["t-abcDEF_-1"].Reason == "leaked" && st.TokenRevoked[idName].Reason == "two"
	})
	f.waitFor(t, "the jti's revocation dropped by etcd at its expiry", func(st State) bool {
		_, ok := st.TokenRevoked["t-abcDEF_-1"]
		return !ok && len(st.TokenRevoked) == 1
	})

	writes := a.Writes()
	for _, bad := range []TokenRevocation{
		{Reason: "neither", ExpiresAt: now.Add(time.Hour)},
		{JTI: "x", SPIFFEID: "spiffe://example.org/web", Reason: "both", ExpiresAt: now.Add(time.Hour)},
		{JTI: "not base64url!", Reason: "bad jti", ExpiresAt: now.Add(time.Hour)},
		{JTI: "old", Reason: "already expired", ExpiresAt: now.Add(-time.Hour)},
	} {
		if err := a.RevokeToken(ctx(t), bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("RevokeToken(%q) = %v, want ErrInvalid", bad.Reason, err)
		}
	}
	if a.Writes() != writes {
		t.Errorf("refused revocations wrote %d times", a.Writes()-writes)
	}
}

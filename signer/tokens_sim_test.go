//go:build cgo

package signer

import (
	"testing"
)

// TestTokenRevocationReachesSync: an open Sync stream of an attested
// agent gets a revocation by jti, then one by SPIFFE ID, each in the next
// message after the revoke, with every revocation in force.
func TestTokenRevocationReachesSync(t *testing.T) {
	a := newSimAgent(t)
	s := serveTestSigner(t, nodePolicy(a.ek), "")
	_, _, st, first := a.attestAndSync(t, s, "v1")
	if n := len(first.GetTokenRevocations()); n != 0 {
		t.Fatalf("%d token revocations before any revoke", n)
	}

	r1, err := s.RevokeToken(TokenRevokeRequest{JTI: "tok1", Reason: "leaked"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got := msg.GetTokenRevocations()
	if len(got) != 1 || got[0].GetJti() != "tok1" || got[0].GetReason() != "leaked" || got[0].GetExpiresAt() != r1.ExpiresAt.Unix() ||
		got[0].GetSpiffeId() != "" || got[0].GetIssuedBefore() != 0 {
		t.Fatalf("after revoke by jti: %v", got)
	}

	r2, err := s.RevokeToken(TokenRevokeRequest{SPIFFEID: "spiffe://example.org/web", Reason: "compromised"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	msg, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got = msg.GetTokenRevocations()
	if len(got) != 2 || got[0].GetSpiffeId() != "spiffe://example.org/web" || got[0].GetIssuedBefore() != r2.IssuedBefore.Unix() ||
		got[0].GetReason() != "compromised" || got[1].GetJti() != "tok1" {
		t.Fatalf("after revoke by SPIFFE ID: %v", got)
	}
	if len(msg.GetEntries()) != 1 || msg.GetBundle() == nil {
		t.Errorf("the message lost its entries or bundle: %v", msg)
	}
}

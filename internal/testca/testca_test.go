package testca

import (
	"crypto/x509"
	"math/big"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// TestSVIDVerifies: what the CA mints is an SVID go-spiffe accepts.
func TestSVIDVerifies(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	ca := New(t, "test CA", td)
	id := spiffeid.RequireFromPath(td, "/web")
	cert, key := ca.SVID(t, id, big.NewInt(7))
	if cert.SerialNumber.Int64() != 7 {
		t.Errorf("serial = %v, want 7", cert.SerialNumber)
	}
	got, _, err := x509svid.Verify([]*x509.Certificate{cert}, x509bundle.FromX509Authorities(td, []*x509.Certificate{ca.Cert}))
	if err != nil || got != id {
		t.Fatalf("Verify = %v, %v; want %v", got, err, id)
	}
	if _, err := x509svid.ParseRaw(cert.Raw, PKCS8(t, key)); err != nil {
		t.Errorf("ParseRaw: %v", err)
	}
	if New(t, "plain", spiffeid.TrustDomain{}).Cert.URIs != nil {
		t.Error("a CA without a trust domain carries a URI")
	}
}

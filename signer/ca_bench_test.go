package signer

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// BenchmarkSignX509SVID measures what the signer does per workload CSR in
// SignX509SVIDs: parse the CSR, check its signature, sign the SVID with the
// current CA. Run with -cpu 1, 1 / (ns/op) is SVIDs signed per second per
// core. The CSRs are made up front: the agent makes them, not the signer.
func BenchmarkSignX509SVID(b *testing.B) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	now := time.Now()
	auth, err := newAuthority(td, 24*time.Hour, time.Hour, restoredState{}, now, hclog.NewNullLogger())
	if err != nil {
		b.Fatalf("newAuthority: %v", err)
	}
	id := spiffeid.RequireFromPath(td, "/web")
	csrs := make([][]byte, 64)
	for i := range csrs {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		if csrs[i], err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		csr, err := x509.ParseCertificateRequest(csrs[i%len(csrs)])
		if err != nil {
			b.Fatalf("parse CSR: %v", err)
		}
		if err := csr.CheckSignature(); err != nil {
			b.Fatalf("CSR signature: %v", err)
		}
		cert, err := auth.sign(csr.PublicKey, id, time.Hour, nil, now)
		if err != nil {
			b.Fatalf("sign: %v", err)
		}
		if cert.URIs[0].String() != id.String() {
			b.Fatalf("signed %v, want %s", cert.URIs, id)
		}
	}
}

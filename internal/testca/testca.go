// Package testca is for tests: a certificate authority that mints real
// X.509 SVIDs (ECDSA P-256), so that what a test serves is parsed and
// verified by real clients, never faked.
package testca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// CA is a self-signed root valid from a minute ago for a day, with a random
// serial (tests tell CAs apart by it).
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// New returns a CA named name; when td is not zero its certificate carries
// the trust domain's SPIFFE ID, as a SPIFFE signing authority's does.
func New(tb testing.TB, name string, td spiffeid.TrustDomain) *CA {
	tb.Helper()
	key := Key(tb)
	tmpl := template(tb, name, true)
	if !td.IsZero() {
		tmpl.URIs = []*url.URL{td.ID().URL()}
	}
	return &CA{Cert: create(tb, tmpl, tmpl, key, key), Key: key}
}

// Intermediate returns a CA named name that ca signed, with no SPIFFE ID.
func (ca *CA) Intermediate(tb testing.TB, name string) *CA {
	tb.Helper()
	key := Key(tb)
	return &CA{Cert: create(tb, template(tb, name, true), ca.Cert, key, ca.Key), Key: key}
}

// Leaf signs a certificate that is no CA, with subject name (which may be
// empty, as an EK certificate's is), for a fresh key.
func (ca *CA) Leaf(tb testing.TB, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	tb.Helper()
	key := Key(tb)
	return create(tb, template(tb, name, false), ca.Cert, key, ca.Key), key
}

// Key returns a fresh P-256 key.
func Key(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("testca: generate key: %v", err)
	}
	return key
}

// SVID signs an X.509-SVID for id and a fresh key, valid from a minute ago
// for an hour. A nil serial is drawn at random.
func (ca *CA) SVID(tb testing.TB, id spiffeid.ID, serial *big.Int) (*x509.Certificate, *ecdsa.PrivateKey) {
	tb.Helper()
	if serial == nil {
		serial = randomSerial(tb)
	}
	key := Key(tb)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id.URL()},
	}
	return create(tb, tmpl, ca.Cert, key, ca.Key), key
}

// PKCS8 encodes key as the Workload API carries it.
func PKCS8(tb testing.TB, key *ecdsa.PrivateKey) []byte {
	tb.Helper()
	b, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatalf("testca: encode key: %v", err)
	}
	return b
}

// template is a certificate named name, valid from a minute ago for a day;
// a CA one when isCA.
func template(tb testing.TB, name string, isCA bool) *x509.Certificate {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(tb),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  isCA,
	}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	}
	return tmpl
}

func randomSerial(tb testing.TB) *big.Int {
	tb.Helper()
	n, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		tb.Fatalf("testca: serial: %v", err)
	}
	return n
}

func create(tb testing.TB, tmpl, parent *x509.Certificate, key, signer *ecdsa.PrivateKey) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		tb.Fatalf("testca: create certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("testca: parse certificate: %v", err)
	}
	return cert
}

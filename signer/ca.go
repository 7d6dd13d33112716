package signer

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// backdate is how far before "now" certificates start, so that a host whose
// clock runs slightly behind the signer's still accepts them.
const backdate = 10 * time.Second

// CA is an X.509 certificate authority whose private key lives only in this
// process's memory. It signs the signer's own SVID, agent SVIDs and workload
// SVIDs; it never writes or exports its key.
type CA struct {
	td   spiffeid.TrustDomain
	key  *ecdsa.PrivateKey
	Cert *x509.Certificate
}

// NewCA creates a self-signed ECDSA P-256 CA for td valid for ttl from now.
func NewCA(td spiffeid.TrustDomain, ttl time.Duration, now time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Lanyard"}, CommonName: "Lanyard CA " + serial.Text(16)[:8]},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(ttl),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	return &CA{td: td, key: key, Cert: cert}, nil
}

// ErrIDOutsideTrustDomain is returned when asked to sign an SVID for another
// trust domain than the CA's.
var ErrIDOutsideTrustDomain = errors.New("SPIFFE ID is not in the CA's trust domain")

// SignX509SVID issues an X.509-SVID for id and pub. The lifetime is ttl,
// cut short so it never outlives the CA. The SPIFFE ID is the caller's
// decision (taken from a policy entry), never read from a CSR.
func (c *CA) SignX509SVID(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration, dnsNames []string, now time.Time) (*x509.Certificate, error) {
	if id.TrustDomain() != c.td {
		return nil, fmt.Errorf("sign %s: %w", id, ErrIDOutsideTrustDomain)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(ttl)
	if notAfter.After(c.Cert.NotAfter) {
		notAfter = c.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Lanyard"}},
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if len(dnsNames) > 0 {
		tmpl.Subject.CommonName = dnsNames[0]
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Cert, pub, c.key)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse SVID for %s: %w", id, err)
	}
	return cert, nil
}

func newSerial() (*big.Int, error) {
	// 128 random bits, positive: RFC 5280 allows up to 20 octets.
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial: %w", err)
	}
	return serial.Add(serial, big.NewInt(1)), nil
}

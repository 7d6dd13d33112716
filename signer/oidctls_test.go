package signer

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/lanyard-dev/lanyard/internal/testport"
)

// oidcServerCert writes a self-signed server certificate for 127.0.0.1
// and its key to certPath and keyPath, stamped at mod, and returns it.
func oidcServerCert(t *testing.T, certPath, keyPath string, mod time.Time) *x509.Certificate {
	t.Helper()
	key := testca.Key(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "oidc.test"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, certPath, "CERTIFICATE", der)
	writePEM(t, keyPath, "PRIVATE KEY", testca.PKCS8(t, key))
	for _, p := range []string{certPath, keyPath} {
		// Distinct stamps, whatever the file system's time granularity.
		if err := os.Chtimes(p, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
	return cert
}

// servedCert is the certificate a fresh TLS connection to addr is shown.
func servedCert(t *testing.T, addr string) *x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // the test compares the certificate itself
	if err != nil {
		t.Fatalf("TLS dial %s: %v", addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

func TestOIDCDiscoveryTLS(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath := filepath.Join(dir, "oidc.pem"), filepath.Join(dir, "oidc-key.pem")
	base := time.Now().Add(-time.Hour)
	first := oidcServerCert(t, certPath, keyPath, base)
	roots := x509.NewCertPool()
	roots.AddCert(first)
	tlsBlock := "  tls {\n    cert_file = \"" + certPath + "\"\n    key_file = \"" + keyPath + "\"\n  }\n"
	o := startOIDCSignerWith(t, "", "https", tlsBlock, &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}})
	addr := strings.TrimPrefix(o.issuer, "https://")

	m := o.mint(t, time.Now(), "vault")
	tok, err := o.verifier(t, "vault", nil).Verify(context.Background(), m.token)
	if err != nil {
		t.Fatalf("go-oidc over HTTPS refuses a JWT-SVID: %v", err)
	}
	if tok.Issuer != o.issuer {
		t.Errorf("iss = %s, want %s", tok.Issuer, o.issuer)
	}

	// A renewal: the next handshake shows the new certificate.
	second := oidcServerCert(t, certPath, keyPath, base.Add(time.Minute))
	if got := servedCert(t, addr); !got.Equal(second) {
		t.Errorf("after the files changed, served certificate %s, want the new one %s", got.SerialNumber, second.SerialNumber)
	}
	// A renewal caught halfway (new certificate, old key): the last good
	// pair stays in use.
	keyBytes, err := os.ReadFile(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	oidcServerCert(t, certPath, filepath.Join(dir, "unused-key.pem"), base.Add(2*time.Minute))
	if got := servedCert(t, addr); !got.Equal(second) {
		t.Errorf("with a mismatched pair, served certificate %s, want the last good one %s", got.SerialNumber, second.SerialNumber)
	}
	if err := os.WriteFile(keyPath, keyBytes, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestOIDCStartFailures: a listener or certificate the signer cannot use
// stops the start with the step named, before anything is served.
func TestOIDCStartFailures(t *testing.T) {
	busy, err := net.Listen("tcp", testport.Free(t))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	missing := filepath.Join(t.TempDir(), "missing.pem")
	tests := []struct {
		name, block, want string
	}{
		{"port in use", "oidc_discovery {\n  listen_address = \"" + busy.Addr().String() + "\"\n  issuer = \"https://o.example.org\"\n}\n",
			"oidc discovery: listen on " + busy.Addr().String() + ": "},
		{"missing certificate", "oidc_discovery {\n  listen_address = \"127.0.0.1:0\"\n  issuer = \"https://o.example.org\"\n  tls {\n    cert_file = \"" + missing + "\"\n    key_file = \"" + missing + "\"\n  }\n}\n",
			"oidc discovery: tls: stat " + missing + ": no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := New(testConfig(t, t.TempDir(), tt.block), hclog.NewNullLogger())
			if err != nil {
				t.Fatal(err)
			}
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer lis.Close()
			err = s.Serve(context.Background(), lis)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Serve = %v, want %q", err, tt.want)
			}
			if errors.Is(err, context.Canceled) {
				t.Error("a start failure reported as a cancellation")
			}
		})
	}
}

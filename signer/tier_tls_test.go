package signer

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/etcdtest"
	"github.com/lanyard-dev/lanyard/internal/testca"
)

// etcdPKI writes, under dir, a CA, a server certificate for 127.0.0.1 and
// a client certificate it signed, as PEM files: what an etcd cluster with
// client TLS and its clients hold.
func etcdPKI(t *testing.T, dir string) (ca, serverCert, serverKey, clientCert, clientKey string) {
	t.Helper()
	root := testca.New(t, "etcd CA", testTD.ID().TrustDomain())
	leaf := func(name string, usage x509.ExtKeyUsage, ips []net.IP) (string, string) {
		key := testca.Key(t)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(time.Now().UnixNano()),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    time.Now().Add(-time.Minute),
			NotAfter:     time.Now().Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			IPAddresses:  ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, root.Cert, key.Public(), root.Key)
		if err != nil {
			t.Fatal(err)
		}
		certPath, keyPath := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
		writePEM(t, certPath, "CERTIFICATE", der)
		writePEM(t, keyPath, "PRIVATE KEY", testca.PKCS8(t, key))
		return certPath, keyPath
	}
	ca = filepath.Join(dir, "ca.pem")
	writePEM(t, ca, "CERTIFICATE", root.Cert.Raw)
	serverCert, serverKey = leaf("server", x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)})
	clientCert, clientKey = leaf("client", x509.ExtKeyUsageClientAuth, nil)
	return
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTierEtcdTLS: a replica reaches an etcd cluster that requires client
// TLS with the etcd block's tls files; without a client certificate etcd
// turns it away, and the replica says so in status and never serves;
// unusable TLS files are refused at New with the file named.
func TestTierEtcdTLS(t *testing.T) {
	dir := t.TempDir()
	ca, srvCert, srvKey, cliCert, cliKey := etcdPKI(t, dir)
	c := etcdtest.StartTLS(t, 1, etcdtest.TLSFiles{CertFile: srvCert, KeyFile: srvKey, TrustedCAFile: ca})
	if !strings.HasPrefix(c.Endpoint(0), "https://") {
		t.Fatalf("endpoint %s: want https", c.Endpoint(0))
	}
	block := func(tls string) string {
		return fmt.Sprintf("replica_name = \"r1\"\netcd {\n  endpoints = [%q]\n  prefix = \"/lanyard/example.org\"\n  tls {\n%s  }\n}\n", c.Endpoint(0), tls)
	}
	good := block(fmt.Sprintf("    ca_file = %q\n    cert_file = %q\n    key_file = %q\n", ca, cliCert, cliKey))
	s := serveTestSigner(t, "", good)
	if st := s.Status(time.Now()); st.TierStatus == nil || !st.Etcd.OK || st.PolicyRevision != 1 {
		t.Fatalf("replica over etcd TLS: %+v, want etcd ok and the policy seeded", st.TierStatus)
	}

	// No client certificate: etcd refuses the handshake.
	noCert := testConfig(t, t.TempDir(), block(fmt.Sprintf("    ca_file = %q\n", ca)))
	s2, err := New(noCert, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("New without a client certificate: %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s2.Serve(ctx, lis) }()
	within(t, 10*time.Second, "etcd's refusal in status", func() bool {
		st := s2.Status(time.Now())
		if st.TierStatus != nil && !st.Etcd.OK && st.Etcd.Error != "" && !strings.Contains(st.Etcd.Error, "no answer from etcd yet") {
			t.Logf("etcd refused the replica: %s", st.Etcd.Error)
			if !strings.Contains(st.Etcd.Error, "the etcd tls block") {
				t.Errorf("status error %q does not say where to look", st.Etcd.Error)
			}
			return true
		}
		return false
	})
	select {
	case <-s2.Ready():
		t.Error("a replica etcd refused serves agents")
	default:
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve after cancel: %v", err)
	}

	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, tls, want string }{
		{"missing ca_file", fmt.Sprintf("    ca_file = %q\n", filepath.Join(dir, "nope.pem")), "etcd tls: ca_file: open " + filepath.Join(dir, "nope.pem")},
		{"ca_file not PEM", fmt.Sprintf("    ca_file = %q\n", notPEM), "etcd tls: ca_file " + notPEM + " holds no PEM certificate"},
		{"key of another certificate", fmt.Sprintf("    cert_file = %q\n    key_file = %q\n", cliCert, srvKey), "etcd tls: cert_file/key_file: tls: private key does not match public key"},
	} {
		if _, err := New(testConfig(t, t.TempDir(), block(tc.tls)), hclog.NewNullLogger()); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: New = %v, want %q", tc.name, err, tc.want)
		}
	}
}

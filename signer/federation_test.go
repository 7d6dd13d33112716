package signer

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/lanyard-dev/lanyard/internal/testport"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

var otherTD = spiffeid.RequireTrustDomainFromString("other.org")

// fedNode is the node block every test signer of a federation test
// knows: the EK servedSigner.agentSVID's agents carry.
var fedNode = "node \"lab\" {\n  ek_sha256 = [\"" + strings.Repeat("ab", 32) + "\"]\n}\n"

// fedTestSigner is a signer of trust domain td under dir, made with New
// but not yet served, with a bundle endpoint on a free loopback port.
type fedTestSigner struct {
	*Signer
	dir, bundleURL string
	logs           *syncBuffer
	serveAddr      string
	stop           func() error
}

// newFedTestSigner makes it from policy and extra config lines. A short
// hint and floor let rotations cross in about a second.
func newFedTestSigner(t *testing.T, dir string, td spiffeid.TrustDomain, policy, extra string) *fedTestSigner {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeTestFile(t, filepath.Join(dir, "policy.hcl"), fedNode+policy)
	addr := testport.Free(t)
	if !strings.Contains(extra, "bundle_endpoint {") {
		extra += "bundle_endpoint {\n  listen_address = \"" + addr + "\"\n}\n"
	}
	src := "trust_domain = \"" + td.Name() + "\"\npolicy_path = \"policy.hcl\"\nbundle_path = \"out/bundle.pem\"\nstate_dir = \"state\"\nca_ttl = \"1h\"\n" + extra
	cfg, err := ParseConfig([]byte(src), filepath.Join(dir, "signer.hcl"))
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	cfg.AdminSocketPath = ""
	logs := &syncBuffer{}
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Output: logs, JSONFormat: true, Level: hclog.Info}))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	s.fedFloor, s.bundleHint = 100*time.Millisecond, time.Second
	return &fedTestSigner{Signer: s, dir: dir, bundleURL: "https://" + cfg.BundleEndpoint.ListenAddress, logs: logs}
}

// writeBundlePEM writes the CAs s publishes now: what its bundle_path
// will hold once it serves.
func (f *fedTestSigner) writeBundlePEM(t *testing.T, path string) {
	t.Helper()
	f.mu.Lock()
	cas := f.auth.published()
	f.mu.Unlock()
	if err := writeBundle(path, cas); err != nil {
		t.Fatal(err)
	}
}

// federate adds a federation block for peer's trust domain, over
// https_spiffe, with peer's bundle as bootstrap.
func (f *fedTestSigner) federate(t *testing.T, peer *fedTestSigner, endpointID string) {
	t.Helper()
	boot := filepath.Join(f.dir, peer.cfg.TrustDomain.Name()+".pem")
	peer.writeBundlePEM(t, boot)
	err := f.addFederation(FederationConfig{TrustDomain: peer.cfg.TrustDomain, URL: peer.bundleURL, Profile: ProfileHTTPSSPIFFE,
		EndpointID: spiffeid.RequireFromString(endpointID), BootstrapBundle: boot})
	if err != nil {
		t.Fatalf("addFederation: %v", err)
	}
}

// serve runs the signer on loopback until stop or the test's end.
func (f *fedTestSigner) serve(t *testing.T) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Serve(ctx, lis) }()
	f.stop = sync.OnceValue(func() error {
		cancel()
		return <-done
	})
	t.Cleanup(func() {
		if err := f.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	select {
	case <-f.Ready():
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	f.serveAddr = lis.Addr().String()
}

// fedStatus is the status of the federation with td.
func (f *fedTestSigner) fedStatus(t *testing.T, td spiffeid.TrustDomain) FederationStatus {
	t.Helper()
	for _, st := range f.Status(time.Now()).Federation {
		if st.TrustDomain == td.Name() {
			return st
		}
	}
	t.Fatalf("no federation status for %s", td.Name())
	return FederationStatus{}
}

// heldCAs is the CAs of td's bundle the signer would push now.
func (f *fedTestSigner) heldCAs(td spiffeid.TrustDomain) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	if b := f.fedBundles[td]; b != nil {
		for _, der := range b.GetX509Authorities() {
			c, _ := x509.ParseCertificate(der)
			out = append(out, serialHex(c))
		}
	}
	return out
}

// ownCAs is the serials of the CAs the signer publishes now.
func (f *fedTestSigner) ownCAs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, der := range f.agentBundle.GetX509Authorities() {
		c, _ := x509.ParseCertificate(der)
		out = append(out, serialHex(c))
	}
	return out
}

// TestFederationBothWays: two signers of two trust domains federate over
// https_spiffe, each bootstrapped with the other's bundle_path; each gets
// the other's bundle (CAs and JWT keys), saves it, and a CA published by
// one reaches the other by the refresh hint.
func TestFederationBothWays(t *testing.T) {
	root := t.TempDir()
	a := newFedTestSigner(t, filepath.Join(root, "a"), testTD, "", "")
	b := newFedTestSigner(t, filepath.Join(root, "b"), otherTD, "", "")
	a.federate(t, b, "spiffe://other.org/lanyard/signer")
	b.federate(t, a, "spiffe://example.org/lanyard/signer")
	a.serve(t)
	b.serve(t)

	within(t, 10*time.Second, "both fetched", func() bool {
		return a.fedStatus(t, otherTD).Trusting == "fetched" && b.fedStatus(t, testTD).Trusting == "fetched"
	})
	if got, want := strings.Join(a.heldCAs(otherTD), ","), strings.Join(b.ownCAs(), ","); got != want {
		t.Errorf("example.org holds other.org CAs %s, want %s", got, want)
	}
	a.mu.Lock()
	held := a.fedBundles[otherTD]
	a.mu.Unlock()
	b.mu.Lock()
	wantKeys, wantSeq := len(b.agentBundle.GetJwtAuthorities()), b.bundleN
	b.mu.Unlock()
	if len(held.GetJwtAuthorities()) != wantKeys || held.GetSequence() != wantSeq || held.GetTrustDomain() != "other.org" {
		t.Errorf("held other.org bundle: %d JWT keys, sequence %d, td %q; want %d, %d, other.org",
			len(held.GetJwtAuthorities()), held.GetSequence(), held.GetTrustDomain(), wantKeys, wantSeq)
	}
	st := a.fedStatus(t, otherTD)
	if st.LastSuccess.IsZero() || st.NextRefresh.IsZero() || st.LastError != "" || st.URL != b.bundleURL || st.Profile != ProfileHTTPSSPIFFE {
		t.Errorf("status = %+v", st)
	}
	saved, _, err := loadFederated(filepath.Join(a.dir, "state", "federated", "other.org.json"), otherTD, ProfileHTTPSSPIFFE)
	if err != nil || saved == nil {
		t.Fatalf("saved bundle: %v, %v", saved, err)
	}

	// A CA published by other.org (its next one, ca_publish_lead before it
	// signs) is at example.org a refresh hint later.
	before := len(b.ownCAs())
	if _, err := b.advanceCAs(time.Now().Add(25 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	if len(b.ownCAs()) != before+1 {
		t.Fatalf("other.org publishes %d CAs after the prepare time, want %d", len(b.ownCAs()), before+1)
	}
	within(t, 10*time.Second, "other.org's next CA at example.org", func() bool {
		return strings.Join(a.heldCAs(otherTD), ",") == strings.Join(b.ownCAs(), ",")
	})
	if !strings.Contains(a.logs.String(), `"federated bundle changed"`) {
		t.Errorf("no federated bundle changed line in the log:\n%s", a.logs.String())
	}
}

// TestBundleEndpointInterop: go-spiffe's federation client, the one the
// SPIFFE specification's reference implementation (and SPIRE's https_spiffe
// authentication) is built on, fetches the served bundle: every CA and JWT
// key agents get, the sequence, the refresh hint. A client expecting
// another SPIFFE ID is refused; other paths and methods get 404 and 405.
func TestBundleEndpointInterop(t *testing.T) {
	s := newFedTestSigner(t, t.TempDir(), testTD, "", "")
	s.bundleHint = defaultRefreshHint(s.cfg.CAPublishLead)
	s.serve(t)
	trust, err := x509bundle.Load(testTD, s.cfg.BundlePath)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got, err := federation.FetchBundle(ctx, testTD, s.bundleURL+"/", federation.WithSPIFFEAuth(trust, s.id))
	if err != nil {
		t.Fatalf("FetchBundle: %v", err)
	}
	s.mu.Lock()
	want := s.agentBundle
	s.mu.Unlock()
	if seq, ok := got.SequenceNumber(); !ok || seq != want.GetSequence() {
		t.Errorf("spiffe_sequence = %d (%v), want %d", seq, ok, want.GetSequence())
	}
	if hint, ok := got.RefreshHint(); !ok || hint != defaultRefreshHint(s.cfg.CAPublishLead) {
		t.Errorf("spiffe_refresh_hint = %s (%v), want %s", hint, ok, defaultRefreshHint(s.cfg.CAPublishLead))
	}
	if len(got.X509Authorities()) != len(want.GetX509Authorities()) || len(got.JWTAuthorities()) != len(want.GetJwtAuthorities()) {
		t.Errorf("fetched %d CAs and %d JWT keys, want %d and %d", len(got.X509Authorities()), len(got.JWTAuthorities()),
			len(want.GetX509Authorities()), len(want.GetJwtAuthorities()))
	}
	for _, k := range want.GetJwtAuthorities() {
		if !got.HasJWTAuthority(k.GetKeyId()) {
			t.Errorf("JWT key %s not served", k.GetKeyId())
		}
	}
	for i, der := range want.GetX509Authorities() {
		if i < len(got.X509Authorities()) && !got.HasX509Authority(mustParseCert(t, der)) {
			t.Errorf("CA %d not served", i)
		}
	}

	_, err = federation.FetchBundle(ctx, testTD, s.bundleURL, federation.WithSPIFFEAuth(trust, spiffeid.RequireFromString("spiffe://example.org/spire/server")))
	if err == nil || !strings.Contains(err.Error(), `unexpected ID "spiffe://example.org/lanyard/signer"`) {
		t.Errorf("FetchBundle expecting another ID: %v", err)
	}

	// The same TLS a relying party uses, for the refusals.
	tr := &http.Transport{TLSClientConfig: tlsClientFor(trust, s.id)}
	defer tr.CloseIdleConnections()
	for _, tc := range []struct {
		method, path string
		code         int
		allow        string
	}{
		{http.MethodGet, "/", http.StatusOK, ""},
		{http.MethodGet, "/bundle", http.StatusNotFound, ""},
		{http.MethodPost, "/", http.StatusMethodNotAllowed, "GET"},
		{http.MethodHead, "/", http.StatusMethodNotAllowed, "GET"},
	} {
		t.Run(tc.method+tc.path, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(ctx, tc.method, s.bundleURL+tc.path, nil)
			resp, err := (&http.Client{Transport: tr}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.code || resp.Header.Get("Allow") != tc.allow {
				t.Errorf("%s %s: %d, Allow %q; want %d, %q", tc.method, tc.path, resp.StatusCode, resp.Header.Get("Allow"), tc.code, tc.allow)
			}
		})
	}
}

func mustParseCert(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// webCert writes a certificate for 127.0.0.1 signed by a fresh test CA
// (and its key) under dir, and returns the CA's file.
func webCert(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	ca := testca.New(t, "web-ca", spiffeid.TrustDomain{})
	key := testca.Key(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "bundle.test"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	caFile, certFile, keyFile = filepath.Join(dir, "web-ca.pem"), filepath.Join(dir, "web.pem"), filepath.Join(dir, "web-key.pem")
	writePEM(t, caFile, "CERTIFICATE", ca.Cert.Raw)
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", testca.PKCS8(t, key))
	return caFile, certFile, keyFile
}

// TestFederationHTTPSWeb: an https_web endpoint with a private CA is
// fetched with ca_file; without it (the system's roots) the fetch fails,
// and status says why.
func TestFederationHTTPSWeb(t *testing.T) {
	root := t.TempDir()
	caFile, certFile, keyFile := webCert(t, root)
	addr := testport.Free(t)
	b := newFedTestSigner(t, filepath.Join(root, "b"), otherTD, "",
		"bundle_endpoint {\n  listen_address = \""+addr+"\"\n  tls {\n    cert_file = \""+certFile+"\"\n    key_file = \""+keyFile+"\"\n  }\n}\n")
	b.bundleURL = "https://" + addr
	b.serve(t)

	extra := func(ca string) string {
		return "federation \"other.org\" {\n  bundle_endpoint_url = \"" + b.bundleURL + "\"\n  profile = \"https_web\"\n" + ca + "}\n"
	}
	good := newFedTestSigner(t, filepath.Join(root, "good"), testTD, "", extra("  ca_file = \""+caFile+"\"\n"))
	good.serve(t)
	system := newFedTestSigner(t, filepath.Join(root, "system"), testTD, "", extra(""))
	system.serve(t)
	within(t, 10*time.Second, "https_web fetch with ca_file", func() bool { return good.fedStatus(t, otherTD).Trusting == "fetched" })
	if got, want := strings.Join(good.heldCAs(otherTD), ","), strings.Join(b.ownCAs(), ","); got != want {
		t.Errorf("held CAs %s, want %s", got, want)
	}
	within(t, 10*time.Second, "a failed https_web fetch in status", func() bool { return system.fedStatus(t, otherTD).LastError != "" })
	if st := system.fedStatus(t, otherTD); st.Trusting != "" || !strings.Contains(st.LastError, "certificate signed by unknown authority") {
		t.Errorf("status without ca_file = %+v", st)
	}
	if len(system.heldCAs(otherTD)) != 0 {
		t.Error("a bundle is held without any fetch succeeding")
	}
}

// TestFederationFailuresAndRestart: a peer that goes away leaves the last
// good bundle in force, with the error in status; a wrong
// endpoint_spiffe_id is refused; a restart trusts the saved bundle even
// once the bootstrap file is gone.
func TestFederationFailuresAndRestart(t *testing.T) {
	root := t.TempDir()
	b := newFedTestSigner(t, filepath.Join(root, "b"), otherTD, "", "")
	b.serve(t)
	a := newFedTestSigner(t, filepath.Join(root, "a"), testTD, "", "")
	a.federate(t, b, "spiffe://other.org/lanyard/signer")
	wrong := newFedTestSigner(t, filepath.Join(root, "wrong"), testTD, "", "")
	wrong.federate(t, b, "spiffe://other.org/spire/server")
	a.serve(t)
	wrong.serve(t)

	within(t, 10*time.Second, "first fetch", func() bool { return a.fedStatus(t, otherTD).Trusting == "fetched" })
	within(t, 10*time.Second, "wrong endpoint ID refused", func() bool { return wrong.fedStatus(t, otherTD).LastError != "" })
	if st := wrong.fedStatus(t, otherTD); st.Trusting != "bootstrap" || !strings.Contains(st.LastError, `unexpected ID "spiffe://other.org/lanyard/signer"`) {
		t.Errorf("wrong endpoint_spiffe_id: status %+v", st)
	}
	held := a.heldCAs(otherTD)
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	within(t, 10*time.Second, "failure in status", func() bool {
		st := a.fedStatus(t, otherTD)
		return st.LastErrorAt.After(st.LastSuccess) && st.Failures > 0
	})
	if st := a.fedStatus(t, otherTD); st.Trusting != "fetched" || strings.Join(a.heldCAs(otherTD), ",") != strings.Join(held, ",") {
		t.Errorf("after failures: trusting %q, CAs %v; want the last good (%v)", st.Trusting, a.heldCAs(otherTD), held)
	}
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}

	// The restart reads its saved bundle, not the (now missing) bootstrap.
	if err := os.Remove(filepath.Join(a.dir, "other.org.pem")); err != nil {
		t.Fatal(err)
	}
	cfg := *a.cfg
	s, err := New(&cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	var st FederationStatus
	for _, f := range s.Status(time.Now()).Federation {
		st = f
	}
	if st.Trusting != "saved" || st.LastSuccess.IsZero() || st.CAs != len(held) {
		t.Errorf("after restart: %+v", st)
	}
	s.mu.Lock()
	n := len(s.fedBundles[otherTD].GetX509Authorities())
	s.mu.Unlock()
	if n != len(held) {
		t.Errorf("restart pushes %d other.org CAs, want %d", n, len(held))
	}

	// Without the saved file and without bootstrap, https_spiffe cannot start.
	if err := os.Remove(filepath.Join(a.dir, "state", "federated", "other.org.json")); err != nil {
		t.Fatal(err)
	}
	fc := cfg.Federations[0]
	fc.BootstrapBundle = ""
	cfg.Federations = []FederationConfig{fc}
	if _, err := New(&cfg, hclog.NewNullLogger()); err == nil || !strings.Contains(err.Error(), "no bootstrap_bundle and no bundle saved") {
		t.Errorf("New without bootstrap or saved bundle: %v", err)
	}
}

// TestCheckFederated: a bundle that is empty, or whose CA names another
// trust domain, is refused, on fetch, on load and as bootstrap.
func TestCheckFederated(t *testing.T) {
	own := testca.New(t, "other", otherTD).Cert
	foreign := testca.New(t, "third", spiffeid.RequireTrustDomainFromString("third.org")).Cert
	plain := testca.New(t, "upstream", spiffeid.TrustDomain{}).Cert
	jwtOnly := spiffebundle.New(otherTD)
	if err := jwtOnly.AddJWTAuthority("k", testca.Key(t).Public()); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		b       *spiffebundle.Bundle
		profile string
		err     string
	}{
		{"its own CA", spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{own}), ProfileHTTPSSPIFFE, ""},
		{"a CA without SPIFFE ID", spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{plain}), ProfileHTTPSSPIFFE, ""},
		{"JWT keys only, https_web", jwtOnly, ProfileHTTPSWeb, ""},
		{"JWT keys only, https_spiffe", jwtOnly, ProfileHTTPSSPIFFE, "no X.509 authority to authenticate"},
		{"empty", spiffebundle.New(otherTD), ProfileHTTPSWeb, "holds no X.509 or JWT authority"},
		{"another domain's CA", spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{own, foreign}), ProfileHTTPSWeb,
			`X.509 authority "CN=third" is trust domain "third.org"'s, not "other.org"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkFederated(tt.b, otherTD, tt.profile)
			if tt.err == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrBadFederatedBundle) || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("err = %v, want ErrBadFederatedBundle with %q", err, tt.err)
			}
		})
	}

	// A saved file of another trust domain fails the start, naming it.
	dir := t.TempDir()
	doc, _ := spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{own}).Marshal()
	data, _ := json.Marshal(savedFederated{TrustDomain: "third.org", Bundle: doc})
	path := filepath.Join(dir, "other.org.json")
	writeTestFile(t, path, string(data))
	if _, _, err := loadFederated(path, otherTD, ProfileHTTPSSPIFFE); !errors.Is(err, ErrBadFederatedBundle) || !strings.Contains(err.Error(), `is trust domain "third.org"'s`) {
		t.Errorf("loadFederated of another domain's file: %v", err)
	}
	// A PEM bootstrap of another domain's CA is refused.
	boot := filepath.Join(dir, "boot.pem")
	writePEM(t, boot, "CERTIFICATE", foreign.Raw)
	if _, err := loadBootstrap(boot, otherTD, ProfileHTTPSSPIFFE); !errors.Is(err, ErrBadFederatedBundle) {
		t.Errorf("loadBootstrap of another domain's CA: %v", err)
	}
	// A SPIFFE-format bootstrap (as SPIRE prints it) is read.
	writeTestFile(t, boot, string(doc))
	if b, err := loadBootstrap(boot, otherTD, ProfileHTTPSSPIFFE); err != nil || len(b.X509Authorities()) != 1 {
		t.Errorf("loadBootstrap of a SPIFFE bundle: %v", err)
	}
}

// TestDefaultRefreshHint: half the publish lead, at most 5m, at least 10s.
func TestDefaultRefreshHint(t *testing.T) {
	for _, tc := range []struct{ lead, want time.Duration }{
		{4 * time.Hour, 5 * time.Minute},
		{6 * time.Minute, 3 * time.Minute},
		{10 * time.Second, 10 * time.Second},
		{time.Second, 10 * time.Second},
	} {
		t.Run(tc.lead.String(), func(t *testing.T) {
			if got := defaultRefreshHint(tc.lead); got != tc.want {
				t.Errorf("defaultRefreshHint(%s) = %s, want %s", tc.lead, got, tc.want)
			}
		})
	}
}

// tlsClientFor is the TLS of an https_spiffe relying party expecting id.
func tlsClientFor(trust *x509bundle.Bundle, id spiffeid.ID) *tls.Config {
	return tlsconfig.TLSClientConfig(trust, tlsconfig.AuthorizeID(id))
}

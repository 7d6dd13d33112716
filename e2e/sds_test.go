package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// TestAgentServesSDS: an Envoy-like client on the real agent's socket,
// without the security header, gets its SVID as `default` and the trust
// bundle as `ROOTCA` over StreamSecrets, the chain verifies against that
// bundle (the one the signer wrote), and a rotation is pushed on the same
// stream after an ACK.
func TestAgentServesSDS(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "10s", "web"))
	e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	cc, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := ctxFor(t, 60*time.Second)
	stream, err := secretv3.NewSecretDiscoveryServiceClient(cc).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"default", "ROOTCA"}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: names}); err != nil {
		t.Fatal(err)
	}
	signerBundle := readPEMCerts(t, e.bundlePath)

	// check verifies one response and returns its SVID's serial.
	check := func(resp *discoveryv3.DiscoveryResponse) string {
		t.Helper()
		if resp.GetVersionInfo() == "" || resp.GetNonce() == "" {
			t.Fatalf("response without version_info or nonce")
		}
		secrets := map[string]*tlsv3.Secret{}
		for _, a := range resp.GetResources() {
			s := &tlsv3.Secret{}
			if err := a.UnmarshalTo(s); err != nil {
				t.Fatal(err)
			}
			secrets[s.GetName()] = s
		}
		tc := secrets["default"].GetTlsCertificate()
		cert, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
		if err != nil {
			t.Fatalf("default: %v", err)
		}
		roots := x509.NewCertPool()
		cas := parsePEMCerts(t, secrets["ROOTCA"].GetValidationContext().GetTrustedCa().GetInlineBytes())
		for _, c := range cas {
			roots.AddCert(c)
		}
		if len(cas) != len(signerBundle) || !slices.ContainsFunc(cas, signerBundle[0].Equal) {
			t.Errorf("ROOTCA holds %d CAs, not the signer's bundle (%d)", len(cas), len(signerBundle))
		}
		inter := x509.NewCertPool()
		for _, der := range cert.Certificate[1:] {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			inter.AddCert(c)
		}
		if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Fatalf("default does not verify against ROOTCA: %v", err)
		}
		if got := cert.Leaf.URIs[0].String(); got != "spiffe://example.org/web" {
			t.Errorf("default is %s, want spiffe://example.org/web", got)
		}
		return cert.Leaf.SerialNumber.Text(16)
	}

	first, err := stream.Recv()
	if err != nil {
		t.Fatalf("first response: %v", err)
	}
	serial := check(first)
	if err := stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: names,
		VersionInfo: first.GetVersionInfo(), ResponseNonce: first.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	// A 10s SVID renews at about half its life: the push comes unasked.
	next, err := stream.Recv()
	if err != nil {
		t.Fatalf("rotation push: %v", err)
	}
	if rotated := check(next); rotated == serial || next.GetVersionInfo() == first.GetVersionInfo() {
		t.Errorf("push kept serial %s / version %s", rotated, next.GetVersionInfo())
	}
	agent.waitLog(t, 10*time.Second, "served SDS secrets")
	if out := agent.out.String(); strings.Contains(out, "PRIVATE KEY") {
		t.Error("the agent logged a private key")
	}
}

func readPEMCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return parsePEMCerts(t, b)
}

func parsePEMCerts(t *testing.T, b []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			return out
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
}

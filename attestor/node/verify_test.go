package node

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	x509ext "github.com/google/go-attestation/x509"
	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TCG attribute OIDs of the EK certificate's subjectAltName directoryName.
var (
	oidTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
)

// The TCG attributes the test EK certificates carry.
const (
	testEKManufacturer = "id:49424D00"
	testEKModel        = "lanyard-sim"
	testEKVersion      = "id:00010002"
)

// ekTestCA is a certificate authority that issues EK certificates in tests.
type ekTestCA struct{ *testca.CA }

func newEKTestRoot(t *testing.T, name string) *ekTestCA {
	t.Helper()
	return &ekTestCA{testca.New(t, name, spiffeid.TrustDomain{})}
}

// intermediate returns a CA that ca signed.
func (ca *ekTestCA) intermediate(t *testing.T, name string) *ekTestCA {
	t.Helper()
	return &ekTestCA{ca.Intermediate(t, name)}
}

// pool returns a pool holding only ca.
func (ca *ekTestCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// issueEK returns a DER EK certificate for pub the way manufacturers write
// them: empty subject, the TPM attributes in a critical subjectAltName.
func (ca *ekTestCA) issueEK(t *testing.T, pub crypto.PublicKey, notAfter time.Time) []byte {
	t.Helper()
	san, err := x509ext.MarshalSubjectAltName(&x509ext.SubjectAltName{
		DirectoryNames: []pkix.Name{{ExtraNames: []pkix.AttributeTypeAndValue{
			{Type: oidTPMManufacturer, Value: testEKManufacturer},
			{Type: oidTPMModel, Value: testEKModel},
			{Type: oidTPMVersion, Value: testEKVersion},
		}}},
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}},
		ExtraExtensions:       []pkix.Extension{san},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		t.Fatalf("issue EK certificate: %v", err)
	}
	return der
}

// softwareEvidence is evidence from a software "TPM": a real EK and CSR but
// an AK and key certification that are garbage. Policy is decided before the
// AK is looked at, so it is enough to test every EK and policy decision.
type softwareEvidence struct {
	ek     *rsa.PrivateKey
	hash   string
	csrKey *ecdsa.PrivateKey
	csr    []byte
}

func newSoftwareEvidence(t *testing.T) *softwareEvidence {
	t.Helper()
	ek, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	hash, err := ekSHA256(ek.Public())
	if err != nil {
		t.Fatal(err)
	}
	csrKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, csrKey)
	if err != nil {
		t.Fatal(err)
	}
	return &softwareEvidence{ek: ek, hash: hash, csrKey: csrKey, csr: csr}
}

func (s *softwareEvidence) evidence(t *testing.T, cert []byte) *Evidence {
	t.Helper()
	pub, err := x509.MarshalPKIXPublicKey(s.ek.Public())
	if err != nil {
		t.Fatal(err)
	}
	ev := &Evidence{EKPublic: pub, EKCertificate: cert, CSR: s.csr}
	ev.AK.Public = []byte("not a TPM public area")
	return ev
}

func TestNewChallengeRefusesBeforeTheTPM(t *testing.T) {
	root := newEKTestRoot(t, "EK Root")
	inter := root.intermediate(t, "EK Intermediate")
	other := newEKTestRoot(t, "Other Root")
	sw := newSoftwareEvidence(t)
	otherEK := newSoftwareEvidence(t)
	valid := time.Now().Add(12 * time.Hour)
	certInter := inter.issueEK(t, sw.ek.Public(), valid)
	certOther := other.issueEK(t, sw.ek.Public(), valid)
	certExpired := inter.issueEK(t, sw.ek.Public(), time.Now().Add(time.Minute))
	certOfOtherEK := inter.issueEK(t, otherEK.ek.Public(), valid)
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edDER, err := x509.MarshalPKIXPublicKey(edPub)
	if err != nil {
		t.Fatal(err)
	}

	pinned := []Rule{{Name: "lab", EKSHA256: []string{sw.hash}}}
	pinnedOther := []Rule{{Name: "lab", EKSHA256: []string{otherEK.hash}}}
	viaCA := []Rule{{Name: "fleet", Roots: root.pool(), Intermediates: inter.pool()}}

	tests := []struct {
		name  string
		ev    func() *Evidence
		rules []Rule
		now   time.Time
		want  error
	}{
		{"nil evidence", func() *Evidence { return nil }, pinned, time.Now(), ErrMalformedEvidence},
		{"no EK", func() *Evidence { return &Evidence{CSR: sw.csr} }, pinned, time.Now(), ErrMalformedEvidence},
		{"garbage EK public key", func() *Evidence { return &Evidence{EKPublic: []byte{0x30, 1, 2}, CSR: sw.csr} }, pinned, time.Now(), ErrMalformedEvidence},
		{"garbage EK certificate", func() *Evidence { return sw.evidence(t, []byte("not DER")) }, pinned, time.Now(), ErrMalformedEvidence},
		{"EK certificate for another key", func() *Evidence { return sw.evidence(t, certOfOtherEK) }, pinned, time.Now(), ErrMalformedEvidence},
		{"ed25519 EK", func() *Evidence { return &Evidence{EKPublic: edDER, CSR: sw.csr} }, pinned, time.Now(), ErrMalformedEvidence},
		{"garbage CSR", func() *Evidence { ev := sw.evidence(t, nil); ev.CSR = []byte("csr"); return ev }, pinned, time.Now(), ErrMalformedEvidence},
		{"no rules", func() *Evidence { return sw.evidence(t, certInter) }, nil, time.Now(), ErrUnknownEK},
		{"pinned elsewhere", func() *Evidence { return sw.evidence(t, nil) }, pinnedOther, time.Now(), ErrUnknownEK},
		{"ek_ca rule, no certificate", func() *Evidence { return sw.evidence(t, nil) }, append(pinnedOther, viaCA...), time.Now(), ErrEKCertMissing},
		{"certificate from another CA", func() *Evidence { return sw.evidence(t, certOther) }, viaCA, time.Now(), ErrEKCertUntrusted},
		{"expired certificate", func() *Evidence { return sw.evidence(t, certExpired) }, viaCA, time.Now().Add(time.Hour), ErrEKCertUntrusted},
		{"certificate only, no EKPublic", func() *Evidence { return &Evidence{EKCertificate: certOther, CSR: sw.csr} }, viaCA, time.Now(), ErrEKCertUntrusted},
		// Accepted by policy: the garbage AK is the first thing refused.
		{"pinned", func() *Evidence { return sw.evidence(t, nil) }, pinned, time.Now(), ErrAKInvalid},
		{"chained through the intermediate", func() *Evidence { return sw.evidence(t, certInter) }, viaCA, time.Now(), ErrAKInvalid},
		{"chained, certificate only", func() *Evidence { return &Evidence{EKCertificate: certInter, CSR: sw.csr} }, viaCA, time.Now(), ErrAKInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ch, err := NewChallenge(tc.ev(), tc.rules, nil, tc.now)
			if !errors.Is(err, tc.want) {
				t.Fatalf("NewChallenge() = %v, %v; want %v", ch, err, tc.want)
			}
		})
	}
}

func TestNewChallengeUntrustedNamesTheReason(t *testing.T) {
	root := newEKTestRoot(t, "EK Root")
	other := newEKTestRoot(t, "Other Root")
	sw := newSoftwareEvidence(t)
	ev := sw.evidence(t, other.issueEK(t, sw.ek.Public(), time.Now().Add(time.Hour)))
	_, err := NewChallenge(ev, []Rule{{Name: "fleet", Roots: root.pool()}}, nil, time.Now())
	if !errors.Is(err, ErrEKCertUntrusted) {
		t.Fatalf("NewChallenge() error = %v, want ErrEKCertUntrusted", err)
	}
	for _, want := range []string{sw.hash, `rule "fleet"`, "unknown authority"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestChallengeVerifyOnce(t *testing.T) {
	secret := bytes.Repeat([]byte{0x5a}, 32)
	wrong := bytes.Repeat([]byte{0xa5}, 32)
	tests := []struct {
		name    string
		answers [][]byte
		want    []error
	}{
		{"right answer", [][]byte{secret}, []error{nil}},
		{"right answer twice", [][]byte{secret, secret}, []error{nil, ErrChallengeUsed}},
		{"wrong answer", [][]byte{wrong}, []error{ErrActivationMismatch}},
		{"short answer", [][]byte{secret[:16]}, []error{ErrActivationMismatch}},
		{"no answer", [][]byte{nil}, []error{ErrActivationMismatch}},
		{"wrong then right", [][]byte{wrong, secret}, []error{ErrActivationMismatch, ErrChallengeUsed}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := &Node{EKSHA256: "ab"}
			c := &Challenge{secret: bytes.Clone(secret), node: node}
			for i, answer := range tc.answers {
				got, err := c.Verify(answer)
				if !errors.Is(err, tc.want[i]) {
					t.Fatalf("answer %d: Verify() error = %v, want %v", i, err, tc.want[i])
				}
				if err == nil && got != node {
					t.Fatalf("answer %d: Verify() = %v, want the challenge's node", i, got)
				}
				if err != nil && strings.Contains(err.Error(), hex.EncodeToString(secret)) {
					t.Fatalf("answer %d: error %q holds the secret", i, err)
				}
			}
		})
	}
}

func TestNodeSelectors(t *testing.T) {
	tests := []struct {
		name string
		node Node
		want []string
	}{
		{"EK only", Node{EKSHA256: "ab12"}, []string{"tpm:ek-sha256:ab12"}},
		{"all", Node{EKSHA256: "ab12", Manufacturer: "id:49424D00", Model: "SLB9670", Version: "id:0007003D"}, []string{
			"tpm:ek-sha256:ab12", "tpm:manufacturer:id:49424D00", "tpm:model:SLB9670", "tpm:version:id:0007003D",
		}},
		{"model missing", Node{EKSHA256: "ab12", Manufacturer: "id:49424D00", Version: "1"}, []string{
			"tpm:ek-sha256:ab12", "tpm:manufacturer:id:49424D00", "tpm:version:1",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, tc.node.Selectors()); diff != "" {
				t.Errorf("Selectors() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

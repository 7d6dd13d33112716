package policy

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func pemOf(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func TestEKCA(t *testing.T) {
	rootCA := testca.New(t, "Test EK Root", spiffeid.TrustDomain{})
	interCA := rootCA.Intermediate(t, "Test EK Intermediate")
	root, inter := rootCA.Cert, interCA.Cert
	ek, _ := interCA.Leaf(t, "")
	// A CA that shares its subject with its issuer but is not self-signed
	// (a cross-signature) must not become a root.
	cross := testca.New(t, "Test EK Root", spiffeid.TrustDomain{}).Intermediate(t, "Test EK Root").Cert

	dir := t.TempDir()
	files := map[string][]byte{
		"root.pem":   pemOf(root),
		"root.der":   root.Raw,
		"inter.pem":  pemOf(inter),
		"chain.pem":  append(append([]byte("# vendor bundle\n"), pemOf(inter)...), pemOf(root)...),
		"cross.pem":  pemOf(cross),
		"pubkey.pem": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte{1, 2, 3}}),
		"bad.pem":    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}}),
		"empty.pem":  nil,
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name              string
		ekCA              string
		roots, inters     []*x509.Certificate
		wantErr           string // with $F for the policy file, $D for its directory
		wantVerifiedChain bool
	}{
		{name: "root alone", ekCA: `["root.pem"]`, roots: []*x509.Certificate{root}},
		{name: "DER root", ekCA: `["root.der"]`, roots: []*x509.Certificate{root}},
		{name: "root and intermediate in two files", ekCA: `["root.pem", "inter.pem"]`, roots: []*x509.Certificate{root}, inters: []*x509.Certificate{inter}, wantVerifiedChain: true},
		{name: "bundle file", ekCA: `["chain.pem"]`, roots: []*x509.Certificate{root}, inters: []*x509.Certificate{inter}, wantVerifiedChain: true},
		{name: "absolute path", ekCA: `["` + filepath.Join(dir, "chain.pem") + `"]`, roots: []*x509.Certificate{root}, inters: []*x509.Certificate{inter}, wantVerifiedChain: true},
		{name: "cross-signed CA is no root", ekCA: `["root.pem", "cross.pem"]`, roots: []*x509.Certificate{root}, inters: []*x509.Certificate{cross}},
		{name: "intermediate alone", ekCA: `["inter.pem"]`, wantErr: `$F:2: ek_ca: no self-signed root certificate among the files; an EK certificate must chain to one`},
		{name: "no certificate among PEM blocks", ekCA: `["pubkey.pem"]`, wantErr: `$F:2: ek_ca: "$D/pubkey.pem" contains no PEM certificate`},
		{name: "empty file", ekCA: `["empty.pem"]`, wantErr: `$F:2: ek_ca: "$D/empty.pem" contains no PEM certificate`},
		{name: "malformed certificate", ekCA: `["bad.pem"]`, wantErr: `$F:2: ek_ca: "$D/bad.pem": certificate 1: x509: malformed certificate`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := filepath.Join(dir, "policy.hcl")
			src := "node \"vendor\" {\n  ek_ca = " + tt.ekCA + "\n}\n"
			p, err := Parse([]byte(src), file, testTD)
			if tt.wantErr != "" {
				want := strings.ReplaceAll(strings.ReplaceAll(tt.wantErr, "$F", file), "$D", dir)
				var errs hclconf.Errors
				if !errors.As(err, &errs) || err.Error() != want {
					t.Fatalf("Parse error:\n got %v\nwant %s", err, want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			n := p.Nodes[0]
			if !n.Roots.Equal(certPool(tt.roots)) {
				t.Errorf("Roots differ from %d expected certificates", len(tt.roots))
			}
			if !n.Intermediates.Equal(certPool(tt.inters)) {
				t.Errorf("Intermediates differ from %d expected certificates", len(tt.inters))
			}
			if tt.inters == nil && n.Intermediates != nil {
				t.Errorf("Intermediates = non-nil pool, want nil when there are none")
			}
			_, verr := ek.Verify(x509.VerifyOptions{Roots: n.Roots, Intermediates: n.Intermediates, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			if got := verr == nil; got != tt.wantVerifiedChain {
				t.Errorf("EK chain verifies = %v (%v), want %v", got, verr, tt.wantVerifiedChain)
			}
			for _, p := range n.EKCA {
				if !filepath.IsAbs(p) {
					t.Errorf("EKCA path %q is not absolute", p)
				}
			}
		})
	}
}

func TestEKCAPathsDeduplicated(t *testing.T) {
	dir := t.TempDir()
	root := testca.New(t, "Test EK Root", spiffeid.TrustDomain{}).Cert
	if err := os.WriteFile(filepath.Join(dir, "root.pem"), pemOf(root), 0o644); err != nil {
		t.Fatal(err)
	}
	src := `node "n" { ek_ca = ["root.pem", "./root.pem", "` + filepath.Join(dir, "root.pem") + `"] }`
	p, err := Parse([]byte(src), filepath.Join(dir, "policy.hcl"), testTD)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{filepath.Join(dir, "root.pem")}, p.Nodes[0].EKCA); diff != "" {
		t.Errorf("EKCA (-want +got):\n%s", diff)
	}
}

func TestReadRegularFileLimit(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.pem")
	if err := os.WriteFile(big, make([]byte, 11), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readRegularFile(big, 10); err == nil || !strings.Contains(err.Error(), "larger than 10 bytes") {
		t.Errorf("readRegularFile over the limit: err = %v, want a size error", err)
	}
	if data, err := readRegularFile(big, 11); err != nil || len(data) != 11 {
		t.Errorf("readRegularFile at the limit: %d bytes, err %v", len(data), err)
	}
}

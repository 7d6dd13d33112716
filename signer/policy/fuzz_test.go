package policy

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/selector"
)

func FuzzParsePolicy(f *testing.F) {
	for _, name := range []string{"valid.hcl", "invalid.hcl"} {
		src, err := os.ReadFile(filepath.Join("..", "..", "testdata", "policy", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(src)
	}
	f.Add([]byte(`node "n" { ek_ca = ["ek-ca.pem"] }
workload "w" {
  spiffe_id = "spiffe://example.org/w"
  nodes = ["n"]
  selectors = ["unix:uid:0", "systemd:unit:a.service"]
  x509_ttl = "10s"
  dns_names = ["a.example"]
  federates_with = ["other.org", "spiffe://third.org", "example.org"]
}`))
	f.Add([]byte(`node "n" { ek_sha256 = ["` + hashA + `"] }
workload "w" {
  spiffe_id = "spiffe://example.org/w"
  nodes = ["n"]
  selectors = ["unix:uid:0"]
  actions {
    ttl = "60s"
    names = ["github.read", "db/*", "db/*"]
  }
}`))
	f.Add([]byte(`workload "w" { selectors = [] nodes = [] spiffe_id = "" }`))
	f.Add([]byte("node \"a\" {\n ek_sha256 = [\n"))

	// ek_ca files in the fuzz input resolve against this directory.
	dir := f.TempDir()
	ca, err := os.ReadFile(filepath.Join("..", "..", "testdata", "policy", "ek-ca.pem"))
	if err != nil {
		f.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ek-ca.pem"), ca, 0o644); err != nil {
		f.Fatal(err)
	}
	file := filepath.Join(dir, "policy.hcl")

	f.Fuzz(func(t *testing.T, src []byte) {
		p, err := Parse(src, file, testTD)
		if err != nil {
			if p != nil {
				t.Fatal("Parse returned a policy and an error")
			}
			var errs hclconf.Errors
			if !errors.As(err, &errs) || len(errs) == 0 {
				t.Fatalf("Parse error is not a non-empty hclconf.Errors: %#v", err)
			}
			for _, e := range errs {
				if e.File != file || e.Line < 1 || e.Msg == "" {
					t.Fatalf("error without a position or message: %#v", e)
				}
			}
			return
		}
		checkInvariants(t, p)
	})
}

// checkInvariants is what the signer relies on from a policy Parse accepted.
func checkInvariants(t *testing.T, p *Policy) {
	t.Helper()
	var nodes []string
	for _, n := range p.Nodes {
		if slices.Contains(nodes, n.Name) {
			t.Fatalf("duplicate node %q", n.Name)
		}
		nodes = append(nodes, n.Name)
		if len(n.EKSHA256) == 0 && len(n.EKCA) == 0 {
			t.Fatalf("node %q matches no TPM", n.Name)
		}
		for _, h := range n.EKSHA256 {
			if !selector.ValidValue(selector.TPMEKSHA256, h) {
				t.Fatalf("node %q: ek_sha256 %q not normalized", n.Name, h)
			}
		}
		if len(n.EKCA) > 0 && n.Roots == nil {
			t.Fatalf("node %q: ek_ca without a root", n.Name)
		}
	}
	var workloads []string
	for _, w := range p.Workloads {
		if slices.Contains(workloads, w.Name) {
			t.Fatalf("duplicate workload %q", w.Name)
		}
		workloads = append(workloads, w.Name)
		if !w.SPIFFEID.MemberOf(testTD) || w.SPIFFEID.Path() == "" || strings.HasPrefix(w.SPIFFEID.Path(), ReservedPathPrefix+"/") {
			t.Fatalf("workload %q: SPIFFE ID %q not allowed", w.Name, w.SPIFFEID)
		}
		if len(w.Nodes) == 0 {
			t.Fatalf("workload %q has no nodes", w.Name)
		}
		for _, n := range w.Nodes {
			if !slices.Contains(nodes, n) {
				t.Fatalf("workload %q names missing node %q", w.Name, n)
			}
		}
		if len(w.Selectors) == 0 || !slices.IsSorted(w.Selectors) || len(slices.Compact(slices.Clone(w.Selectors))) != len(w.Selectors) {
			t.Fatalf("workload %q: selectors %q empty, unsorted or duplicated", w.Name, w.Selectors)
		}
		for _, s := range w.Selectors {
			if err := selector.Validate(s); err != nil {
				t.Fatalf("workload %q: %v", w.Name, err)
			}
		}
		if w.X509TTL < MinTTL || w.JWTTTL < MinTTL {
			t.Fatalf("workload %q: TTLs %s/%s below %s", w.Name, w.X509TTL, w.JWTTTL, MinTTL)
		}
		for _, d := range w.DNSNames {
			if err := validateDNSName(d); err != nil {
				t.Fatalf("workload %q: DNS name %q: %v", w.Name, d, err)
			}
		}
		for i, td := range w.FederatesWith {
			if td.IsZero() || td == testTD || slices.Contains(w.FederatesWith[:i], td) {
				t.Fatalf("workload %q: federates_with %q: empty, own or duplicated", w.Name, w.FederatesWith)
			}
		}
	}
}

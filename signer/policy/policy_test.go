package policy

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var testTD = spiffeid.RequireTrustDomainFromString("example.org")

const (
	hashA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	hashB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

// policyOpts compares SPIFFE IDs by value and leaves the cert pools to
// tests that check them on purpose.
var policyOpts = cmp.Options{
	cmpopts.IgnoreFields(Node{}, "Roots", "Intermediates"),
	cmpopts.EquateComparable(spiffeid.ID{}, spiffeid.TrustDomain{}),
}

func TestLoadTestdata(t *testing.T) {
	path := filepath.Join("..", "..", "testdata", "policy", "valid.hcl")
	p, err := Load(path, testTD)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	caPath, err := filepath.Abs(filepath.Join("..", "..", "testdata", "policy", "ek-ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	want := &Policy{
		Path: path,
		Nodes: []Node{
			{Name: "lab", EKSHA256: []string{"6c0dfe62a2c3a56a0e3e0a3b1a22e7e4b5c9f1d0a8e3f2b7c6d5e4f3a2b1c0d9"}, EKCA: []string{caPath}},
			{Name: "edge", EKSHA256: []string{"0000000000000000000000000000000000000000000000000000000000000001"}},
		},
		Workloads: []Workload{
			{
				Name:      "web",
				SPIFFEID:  spiffeid.RequireFromString("spiffe://example.org/web"),
				Nodes:     []string{"lab"},
				Selectors: []string{"systemd:unit:web.service", "unix:uid:1000"},
				X509TTL:   10 * time.Second,
				JWTTTL:    time.Minute,
				DNSNames:  []string{"web.internal", "*.web.internal"},
				Hint:      "internal",
			},
			{
				Name:      "db",
				SPIFFEID:  spiffeid.RequireFromString("spiffe://example.org/db"),
				Nodes:     []string{"lab", "edge"},
				Selectors: []string{"cgroup:path:/system.slice/postgresql.service"},
				X509TTL:   DefaultX509TTL,
				JWTTTL:    DefaultJWTTTL,
			},
		},
	}
	if diff := cmp.Diff(want, p, policyOpts); diff != "" {
		t.Errorf("Load mismatch (-want +got):\n%s", diff)
	}
	if p.Nodes[0].Roots == nil || p.Nodes[0].Intermediates != nil {
		t.Errorf("lab pools: roots %v, intermediates %v; want the self-signed test CA as the only root", p.Nodes[0].Roots, p.Nodes[0].Intermediates)
	}
	if p.Nodes[1].Roots != nil || p.Nodes[1].Intermediates != nil {
		t.Errorf("edge pools: want none for a node with no ek_ca")
	}
}

func TestLoadInvalidTestdata(t *testing.T) {
	path := filepath.Join("..", "..", "testdata", "policy", "invalid.hcl")
	_, err := Load(path, testTD)
	var errs hclconf.Errors
	if !errors.As(err, &errs) {
		t.Fatalf("Load error = %v, want hclconf.Errors", err)
	}
	missing, _ := filepath.Abs(filepath.Join("..", "..", "testdata", "policy", "missing.pem"))
	want := strings.Join([]string{
		path + `:2: ek_sha256: "not-a-hash" is not a SHA-256 (64 hex digits)`,
		path + `:3: ek_ca: cannot read "` + missing + `": no such file or directory`,
		path + `:6: duplicate node "lab" (first defined at line 1)`,
		path + `:10: node "empty": set ek_sha256 or ek_ca, or it matches no TPM`,
		path + `:14: spiffe_id: "spiffe://other.org/web" is not in trust domain "example.org"`,
		path + `:15: nodes: no node block named "nowhere"`,
		path + `:16: selectors: invalid selector "unix:pid:1": unknown key "pid" for type "unix" (want uid, gid, user, group, path, sha256)`,
		path + `:17: x509_ttl: 5s is below the minimum of 10s`,
		path + `:18: dns_names: "bad_name.internal": label contains a character other than a letter, digit or '-'`,
		path + `:19: Unsupported argument: An argument named "colour" is not expected here.`,
		path + `:22: Missing required argument: The argument "selectors" is required, but no definition was found.`,
	}, "\n")
	if diff := cmp.Diff(want, err.Error()); diff != "" {
		t.Errorf("errors mismatch (-want +got):\n%s", diff)
	}
	if len(errs) != 11 {
		t.Errorf("got %d errors, want 11", len(errs))
	}
}

func TestLoadUnreadable(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.hcl"), testTD)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load error = %v, want fs.ErrNotExist", err)
	}
	var errs hclconf.Errors
	if errors.As(err, &errs) {
		t.Errorf("an unreadable file is not a policy error, got %v", errs)
	}
}

func TestParseValid(t *testing.T) {
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	tests := []struct {
		name string
		src  string
		want *Policy
	}{
		{
			name: "empty file",
			src:  "# nothing yet\n",
			want: &Policy{},
		},
		{
			name: "defaults and normalization",
			src: `
workload "web" {
  spiffe_id = "spiffe://example.org/web"
  nodes     = ["n1", "n1"]
  selectors = ["unix:uid:0", "k8s:pod-uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "unix:uid:0", "container:id:` + hashB + `"]
}
node "n1" {
  ek_sha256 = ["` + strings.ToUpper(hashA) + `", "` + hashA + `"]
}
`,
			want: &Policy{
				Nodes: []Node{{Name: "n1", EKSHA256: []string{hashA}}},
				Workloads: []Workload{{
					Name:      "web",
					SPIFFEID:  web,
					Nodes:     []string{"n1"},
					Selectors: []string{"container:id:" + hashB, "k8s:pod-uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "unix:uid:0"},
					X509TTL:   time.Hour,
					JWTTTL:    5 * time.Minute,
				}},
			},
		},
		{
			name: "minimum TTLs and selector values with colons",
			src: `
node "n1" { ek_sha256 = ["` + hashA + `"] }
workload "web" {
  spiffe_id = "spiffe://example.org/web"
  nodes     = ["n1"]
  selectors = ["cgroup:path:/a:b/c", "systemd:unit:getty@tty1.service"]
  x509_ttl  = "10s"
  jwt_ttl   = "10s"
  hint      = ""
}
`,
			want: &Policy{
				Nodes: []Node{{Name: "n1", EKSHA256: []string{hashA}}},
				Workloads: []Workload{{
					Name:      "web",
					SPIFFEID:  web,
					Nodes:     []string{"n1"},
					Selectors: []string{"cgroup:path:/a:b/c", "systemd:unit:getty@tty1.service"},
					X509TTL:   10 * time.Second,
					JWTTTL:    10 * time.Second,
				}},
			},
		},
		{
			name: "federates_with in file order",
			src: `
node "n1" { ek_sha256 = ["` + hashA + `"] }
workload "web" {
  spiffe_id      = "spiffe://example.org/web"
  nodes          = ["n1"]
  selectors      = ["unix:uid:0"]
  federates_with = ["other.org", "partner.example.com"]
}
`,
			want: &Policy{
				Nodes: []Node{{Name: "n1", EKSHA256: []string{hashA}}},
				Workloads: []Workload{{
					Name:          "web",
					SPIFFEID:      web,
					Nodes:         []string{"n1"},
					Selectors:     []string{"unix:uid:0"},
					X509TTL:       time.Hour,
					JWTTTL:        5 * time.Minute,
					FederatesWith: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("other.org"), spiffeid.RequireTrustDomainFromString("partner.example.com")},
				}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "policy.hcl")
			got, err := Parse([]byte(tt.src), file, testTD)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tt.want.Path = file
			if diff := cmp.Diff(tt.want, got, policyOpts); diff != "" {
				t.Errorf("Parse mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseNoTrustDomain(t *testing.T) {
	_, err := Parse(nil, "p.hcl", spiffeid.TrustDomain{})
	if err == nil {
		t.Fatal("Parse with a zero trust domain succeeded")
	}
}

// TestParseErrors checks each kind of problem gives exactly the expected
// "file:line: message" lines. In want, "$F" stands for the policy file and
// "$D" for its directory.
func TestParseErrors(t *testing.T) {
	node := `node "n1" { ek_sha256 = ["` + hashA + `"] }` + "\n"
	workload := func(body string) string {
		return node + "workload \"w\" {\n" + body + "\n}\n" // the body starts on line 3
	}
	const okID = `spiffe_id = "spiffe://example.org/w"` + "\n"
	const okNodes = `nodes = ["n1"]` + "\n"
	const okSel = `selectors = ["unix:uid:1"]` + "\n"
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"syntax error", "node \"a\" {\n  ek_sha256 = [\n", []string{
			`$F:3: Missing expression: Expected the start of an expression, but found the end of the file.`,
		}},
		{"unknown block type", "nod \"a\" {}\n", []string{
			`$F:1: Unsupported block type: Blocks of type "nod" are not expected here. Did you mean "node"?`,
		}},
		{"unknown attribute at top level", "trust_domain = \"example.org\"\n", []string{
			`$F:1: Unsupported argument: An argument named "trust_domain" is not expected here.`,
		}},
		{"node without a name", "node {\n}\n", []string{
			`$F:1: Missing name for node: All node blocks must have 1 labels (name).`,
		}},
		{"bad node name", "node \"a b\" {\n ek_sha256 = [\"" + hashA + "\"]\n}\n", []string{
			`$F:1: node name "a b": use letters, digits, '.', '_' and '-'`,
		}},
		{"unknown attribute in node", "node \"a\" {\n ek_sha256 = [\"" + hashA + "\"]\n ek_sha1 = []\n}\n", []string{
			`$F:3: Unsupported argument: An argument named "ek_sha1" is not expected here.`,
		}},
		{"duplicate node", node + "\n" + node, []string{
			`$F:3: duplicate node "n1" (first defined at line 1)`,
		}},
		{"duplicate workload", workload(okID+okNodes+okSel) + "workload \"w\" {\n" + okID + okNodes + okSel + "}\n", []string{
			`$F:8: duplicate workload "w" (first defined at line 2)`,
		}},
		{"node with neither ek_sha256 nor ek_ca", "\nnode \"a\" {\n}\n", []string{
			`$F:2: node "a": set ek_sha256 or ek_ca, or it matches no TPM`,
		}},
		{"node with empty lists", "node \"a\" {\n ek_sha256 = []\n ek_ca = []\n}\n", []string{
			`$F:1: node "a": set ek_sha256 or ek_ca, or it matches no TPM`,
		}},
		{"ek_sha256 too short", "node \"a\" {\n ek_sha256 = [\"abc\"]\n}\n", []string{
			`$F:2: ek_sha256: "abc" is not a SHA-256 (64 hex digits)`,
		}},
		{"ek_sha256 not hex, element on its own line", "node \"a\" {\n ek_sha256 = [\n  \"" + hashA + "\",\n  \"" + strings.Repeat("g", 64) + "\",\n ]\n}\n", []string{
			`$F:4: ek_sha256: "` + strings.Repeat("g", 64) + `" is not a SHA-256 (64 hex digits)`,
		}},
		{"ek_sha256 a string, not a list", "node \"a\" {\n ek_sha256 = \"" + hashA + "\"\n}\n", []string{
			`$F:2: ek_sha256: expected a list of strings, got string`,
		}},
		{"ek_sha256 element a number", "node \"a\" {\n ek_sha256 = [12]\n}\n", []string{
			`$F:2: ek_sha256[0]: expected a string, got number`,
		}},
		{"ek_ca missing", "node \"a\" {\n ek_ca = [\"nope.pem\"]\n}\n", []string{
			`$F:2: ek_ca: cannot read "$D/nope.pem": no such file or directory`,
		}},
		{"ek_ca without a certificate", "node \"a\" {\n ek_ca = [\"notes.txt\"]\n}\n", []string{
			`$F:2: ek_ca: "$D/notes.txt" contains no PEM certificate`,
		}},
		{"ek_ca a directory", "node \"a\" {\n ek_ca = [\".\"]\n}\n", []string{
			`$F:2: ek_ca: "$D" is not a regular file`,
		}},
		{"spiffe_id unparsable", workload(`spiffe_id = "https://example.org/w"` + "\n" + okNodes + okSel), []string{
			`$F:3: spiffe_id: "https://example.org/w": scheme is missing or invalid`,
		}},
		{"spiffe_id in another trust domain", workload(`spiffe_id = "spiffe://example.com/w"` + "\n" + okNodes + okSel), []string{
			`$F:3: spiffe_id: "spiffe://example.com/w" is not in trust domain "example.org"`,
		}},
		{"spiffe_id without a path", workload(`spiffe_id = "spiffe://example.org"` + "\n" + okNodes + okSel), []string{
			`$F:3: spiffe_id: "spiffe://example.org" has no path; a workload ID needs one`,
		}},
		{"spiffe_id of an agent", workload(`spiffe_id = "spiffe://example.org/lanyard/agent/tpm/` + hashA + `"` + "\n" + okNodes + okSel), []string{
			`$F:3: spiffe_id: "spiffe://example.org/lanyard/agent/tpm/` + hashA + `": paths under /lanyard are reserved for Lanyard's own identities`,
		}},
		{"nodes names no node", workload(okID + `nodes = ["n1", "n2"]` + "\n" + okSel), []string{
			`$F:4: nodes: no node block named "n2"`,
		}},
		{"nodes empty", workload(okID + `nodes = []` + "\n" + okSel), []string{
			`$F:4: nodes: name at least one node block`,
		}},
		{"selectors missing", workload(okID + okNodes), []string{
			`$F:2: Missing required argument: The argument "selectors" is required, but no definition was found.`,
		}},
		{"selectors empty", workload(okID + okNodes + `selectors = []`), []string{
			`$F:5: selectors: at least one selector is required`,
		}},
		{"bad selector on its own line", workload(okID + okNodes + "selectors = [\n  \"unix:uid:1\",\n  \"unix:uid:one\",\n]"), []string{
			`$F:7: selectors: invalid selector "unix:uid:one": want a decimal number without leading zeros`,
		}},
		{"x509_ttl unparsable", workload(okID + okNodes + okSel + `x509_ttl = "1 hour"`), []string{
			`$F:6: x509_ttl: invalid duration "1 hour" (write it like "90s", "5m" or "1h")`,
		}},
		{"jwt_ttl below the minimum", workload(okID + okNodes + okSel + `jwt_ttl = "9s"`), []string{
			`$F:6: jwt_ttl: 9s is below the minimum of 10s`,
		}},
		{"x509_ttl a number", workload(okID + okNodes + okSel + `x509_ttl = 3600`), []string{
			`$F:6: x509_ttl: expected a string, got number`,
		}},
		{"bad dns name", workload(okID + okNodes + okSel + `dns_names = ["ok.example", "-bad.example", "10.0.0.1"]`), []string{
			`$F:6: dns_names: "-bad.example": label starts or ends with '-'`,
			`$F:6: dns_names: "10.0.0.1": an IP address, not a DNS name`,
		}},
		{"federates_with problems", workload(okID + okNodes + okSel + "federates_with = [\"other.org\", \"Other.org\", \"spiffe://third.org\", \"example.org\",\n \"other.org\", \"\"]"), []string{
			`$F:6: federates_with: "Other.org": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`,
			`$F:6: federates_with: "spiffe://third.org": write the trust domain name ("third.org")`,
			`$F:6: federates_with: "example.org" is this policy's own trust domain`,
			`$F:7: federates_with: "other.org" is listed twice (first at line 6)`,
			`$F:7: federates_with: "": trust domain is missing`,
		}},
		{"federates_with not a list", workload(okID + okNodes + okSel + `federates_with = "other.org"`), []string{
			`$F:6: federates_with: expected a list of strings, got string`,
		}},
		{"variable reference", workload(okID + okNodes + okSel + `hint = var.hint`), []string{
			`$F:6: Variables not allowed: Variables may not be used here.`,
		}},
		{"several problems in one file", "node \"a\" {\n}\nworkload \"w\" {\n spiffe_id = 7\n nodes = [\"b\"]\n selectors = [\"x:y:z\"]\n jwt_ttl = \"0s\"\n}\n", []string{
			`$F:1: node "a": set ek_sha256 or ek_ca, or it matches no TPM`,
			`$F:4: spiffe_id: expected a string, got number`,
			`$F:5: nodes: no node block named "b"`,
			`$F:6: selectors: invalid selector "x:y:z": unknown type "x" (want unix, systemd, cgroup, container or k8s)`,
			`$F:7: jwt_ttl: 0s is below the minimum of 10s`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not a certificate\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			file := filepath.Join(dir, "policy.hcl")
			p, err := Parse([]byte(tt.src), file, testTD)
			if p != nil {
				t.Errorf("Parse returned a policy along with errors")
			}
			var errs hclconf.Errors
			if !errors.As(err, &errs) {
				t.Fatalf("Parse error = %v, want hclconf.Errors", err)
			}
			var got []string
			for _, e := range errs {
				got = append(got, e.Error())
			}
			want := make([]string, len(tt.want))
			for i, w := range tt.want {
				w = strings.Replace(w, "$F:", file+":", 1)
				want[i] = strings.ReplaceAll(w, "$D", dir)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("errors mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestWorkloadsForNodes(t *testing.T) {
	p := &Policy{Workloads: []Workload{
		{Name: "a", Nodes: []string{"lab"}},
		{Name: "b", Nodes: []string{"edge", "lab"}},
		{Name: "c", Nodes: []string{"edge"}},
	}}
	tests := []struct {
		nodes []string
		want  []string
	}{
		{nil, nil},
		{[]string{"lab"}, []string{"a", "b"}},
		{[]string{"edge"}, []string{"b", "c"}},
		{[]string{"lab", "edge"}, []string{"a", "b", "c"}},
		{[]string{"other"}, nil},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.nodes, ","), func(t *testing.T) {
			var got []string
			for _, w := range p.WorkloadsForNodes(tt.nodes) {
				got = append(got, w.Name)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("WorkloadsForNodes(%v) (-want +got):\n%s", tt.nodes, diff)
			}
		})
	}
}

func TestNodesWithEK(t *testing.T) {
	p := &Policy{Nodes: []Node{
		{Name: "lab", EKSHA256: []string{hashA}},
		{Name: "edge", EKSHA256: []string{hashB, hashA}},
		{Name: "vendor"},
	}}
	tests := []struct {
		name, ek string
		want     []string
	}{
		{"pinned twice", hashA, []string{"lab", "edge"}},
		{"upper case", strings.ToUpper(hashB), []string{"edge"}},
		{"unknown", strings.Repeat("c", 64), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, p.NodesWithEK(tt.ek)); diff != "" {
				t.Errorf("NodesWithEK (-want +got):\n%s", diff)
			}
		})
	}
}

// The test CA in testdata must stay a public certificate only.
func TestTestdataHoldsNoKey(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "policy", "ek-ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), "PRIVATE KEY") {
		t.Fatal("testdata/policy/ek-ca.pem holds a private key")
	}
	certs, err := parseCerts(data)
	if err != nil || len(certs) != 1 || !isSelfSigned(certs[0]) {
		t.Fatalf("ek-ca.pem: %d certs, err %v; want one self-signed certificate", len(certs), err)
	}
}

package signer

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestFederationConfig(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n" // lines 1-3
	dir := t.TempDir()
	tests := []struct {
		name     string
		src      string
		endpoint *BundleEndpointConfig
		feds     []FederationConfig
	}{
		{"none", "", nil, nil},
		{"bundle endpoint defaults", "bundle_endpoint {}\n", &BundleEndpointConfig{ListenAddress: DefaultBundleEndpointAddress}, nil},
		{"bundle endpoint https_web", "bundle_endpoint {\n  listen_address = \"127.0.0.1:9445\"\n  refresh_hint = \"1m\"\n  tls {\n    cert_file = \"c.pem\"\n    key_file = \"k.pem\"\n  }\n}\n",
			&BundleEndpointConfig{ListenAddress: "127.0.0.1:9445", RefreshHint: time.Minute, CertFile: filepath.Join(dir, "c.pem"), KeyFile: filepath.Join(dir, "k.pem")}, nil},
		{"federations", `federation "other.org" {
  bundle_endpoint_url = "https://spire.other.org:8443"
  profile             = "https_spiffe"
  endpoint_spiffe_id  = "spiffe://other.org/spire/server"
  bootstrap_bundle    = "other.org.pem"
}
federation "web.example" {
  bundle_endpoint_url = "https://bundle.web.example/"
  profile             = "https_web"
  ca_file             = "/etc/roots.pem"
}
`, nil, []FederationConfig{
			{TrustDomain: spiffeid.RequireTrustDomainFromString("other.org"), URL: "https://spire.other.org:8443", Profile: ProfileHTTPSSPIFFE,
				EndpointID: spiffeid.RequireFromString("spiffe://other.org/spire/server"), BootstrapBundle: filepath.Join(dir, "other.org.pem")},
			{TrustDomain: spiffeid.RequireTrustDomainFromString("web.example"), URL: "https://bundle.web.example/", Profile: ProfileHTTPSWeb, CAFile: "/etc/roots.pem"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), filepath.Join(dir, "c.hcl"))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if diff := cmp.Diff(tt.endpoint, cfg.BundleEndpoint); diff != "" {
				t.Errorf("bundle_endpoint (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.feds, cfg.Federations, cmpopts.EquateComparable(spiffeid.ID{}, spiffeid.TrustDomain{})); diff != "" {
				t.Errorf("federations (-want +got):\n%s", diff)
			}
		})
	}
}

func TestFederationConfigErrors(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n" // lines 1-3
	fed := func(label, body string) string { return "federation \"" + label + "\" {\n" + body + "}\n" }   // body from line 5
	const spiffeOK = "  bundle_endpoint_url = \"https://h:8443\"\n  profile = \"https_spiffe\"\n  endpoint_spiffe_id = \"spiffe://other.org/x\"\n"
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"endpoint shares the agent port", "bundle_endpoint { listen_address = \"127.0.0.1:8443\" }\n", []string{
			`c.hcl:4: listen_address: "127.0.0.1:8443" is the signer's listen_address too: give the bundle endpoint its own port`}},
		{"two endpoints", "bundle_endpoint {}\nbundle_endpoint {}\n", []string{`c.hcl:5: only one bundle_endpoint block is allowed (first at line 4)`}},
		{"hint too short", "bundle_endpoint { refresh_hint = \"1s\" }\n", []string{`c.hcl:4: refresh_hint: 1s is below the minimum of 10s`}},
		{"own trust domain", fed("example.org", strings.ReplaceAll(spiffeOK, "other.org", "example.org")), []string{
			`c.hcl:4: federation "example.org": that is this signer's own trust domain`}},
		{"label not a trust domain", fed("spiffe://other.org", spiffeOK), []string{
			`c.hcl:4: federation "spiffe://other.org": the label must be a trust domain name such as "other.org": not a trust domain name`}},
		{"duplicate", fed("other.org", spiffeOK) + fed("other.org", spiffeOK), []string{
			`c.hcl:9: duplicate federation "other.org" (first defined at line 4)`}},
		{"http URL and bad profile", fed("other.org", "  bundle_endpoint_url = \"http://h\"\n  profile = \"https\"\n"), []string{
			`c.hcl:5: bundle_endpoint_url: "http://h" must be an https:// URL (both profiles are TLS)`,
			`c.hcl:6: profile: "https" is not one of https_spiffe, https_web`}},
		{"https_spiffe without endpoint ID", fed("other.org", "  bundle_endpoint_url = \"https://h\"\n  profile = \"https_spiffe\"\n"), []string{
			`c.hcl:4: federation "other.org": profile "https_spiffe" needs endpoint_spiffe_id: the SPIFFE ID the endpoint presents (spiffe://other.org/lanyard/signer for a Lanyard signer, spiffe://other.org/spire/server for SPIRE)`}},
		{"endpoint ID of another domain", fed("other.org", strings.ReplaceAll(spiffeOK, "spiffe://other.org/x", "spiffe://third.org/x")), []string{
			`c.hcl:7: endpoint_spiffe_id: "spiffe://third.org/x" is not in trust domain "other.org", whose bundle authenticates the endpoint`}},
		{"ca_file with https_spiffe", fed("other.org", spiffeOK+"  ca_file = \"r.pem\"\n"), []string{
			`c.hcl:8: ca_file: only for profile "https_web"; an https_spiffe endpoint is authenticated by its trust domain's bundle (bootstrap_bundle, then each fetched one)`}},
		{"endpoint ID with https_web", fed("other.org", "  bundle_endpoint_url = \"https://h\"\n  profile = \"https_web\"\n  endpoint_spiffe_id = \"spiffe://other.org/x\"\n"), []string{
			`c.hcl:7: endpoint_spiffe_id: only for profile "https_spiffe"; an https_web endpoint is authenticated by its Web PKI certificate`}},
		{"missing URL", fed("other.org", "  profile = \"https_web\"\n"), []string{
			`c.hcl:4: Missing required argument: The argument "bundle_endpoint_url" is required, but no definition was found.`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(required+tt.src), "c.hcl")
			var es hclconf.Errors
			if !errors.As(err, &es) {
				t.Fatalf("err = %v, want hclconf.Errors", err)
			}
			var got []string
			for _, e := range es {
				got = append(got, e.Error())
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}

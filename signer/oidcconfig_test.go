package signer

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

func TestOIDCConfig(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n" // lines 1-3
	dir := t.TempDir()
	tests := []struct {
		name string
		src  string
		want *OIDCConfig
	}{
		{"no block", "", nil},
		{"issuer only: loopback default", "oidc_discovery { issuer = \"https://oidc.example.org\" }\n",
			&OIDCConfig{ListenAddress: DefaultOIDCListenAddress, Issuer: "https://oidc.example.org"}},
		{"public listener, path, tls", "oidc_discovery {\n  listen_address = \"0.0.0.0:443\"\n  issuer = \"https://example.org:8443/lanyard/prod\"\n  tls {\n    cert_file = \"tls/cert.pem\"\n    key_file = \"/etc/tls/key.pem\"\n  }\n}\n",
			&OIDCConfig{ListenAddress: "0.0.0.0:443", Issuer: "https://example.org:8443/lanyard/prod",
				CertFile: filepath.Join(dir, "tls", "cert.pem"), KeyFile: "/etc/tls/key.pem"}},
		{"http on localhost", "oidc_discovery {\n  listen_address = \"127.0.0.1:0\"\n  issuer = \"http://localhost:8446\"\n}\n",
			&OIDCConfig{ListenAddress: "127.0.0.1:0", Issuer: "http://localhost:8446"}},
		{"http on a loopback IP", "oidc_discovery { issuer = \"http://[::1]:8446\" }\n",
			&OIDCConfig{ListenAddress: DefaultOIDCListenAddress, Issuer: "http://[::1]:8446"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), filepath.Join(dir, "c.hcl"))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if diff := cmp.Diff(tt.want, cfg.OIDC); diff != "" {
				t.Errorf("OIDC (-want +got):\n%s", diff)
			}
		})
	}
}

func TestOIDCConfigErrors(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n" // lines 1-3
	block := func(issuer string) string { return "oidc_discovery { issuer = \"" + issuer + "\" }\n" }
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"no issuer", "oidc_discovery {}\n", []string{
			`c.hcl:4: Missing required argument: The argument "issuer" is required, but no definition was found.`}},
		{"empty issuer", block(""), []string{`c.hcl:4: issuer: must not be empty`}},
		{"issuer not a string", "oidc_discovery { issuer = 1 }\n", []string{`c.hcl:4: issuer: expected a string, got number`}},
		{"http on a public host", block("http://oidc.example.org"), []string{
			`c.hcl:4: issuer: "http://oidc.example.org" must be an https:// URL (http:// only for localhost or a loopback IP)`}},
		{"no scheme", block("oidc.example.org"), []string{
			`c.hcl:4: issuer: "oidc.example.org" must be an https:// URL (http:// only for localhost or a loopback IP)`}},
		{"no host", block("https:///path"), []string{`c.hcl:4: issuer: "https:///path" has no host`}},
		{"query", block("https://oidc.example.org?td=a"), []string{
			`c.hcl:4: issuer: "https://oidc.example.org?td=a" must not have a query (relying parties append /.well-known/openid-configuration to it)`}},
		{"empty query", block("https://oidc.example.org?"), []string{
			`c.hcl:4: issuer: "https://oidc.example.org?" must not have a query (relying parties append /.well-known/openid-configuration to it)`}},
		{"fragment", block("https://oidc.example.org#x"), []string{`c.hcl:4: issuer: "https://oidc.example.org#x" must not have a fragment`}},
		{"user info", block("https://me@oidc.example.org"), []string{`c.hcl:4: issuer: "https://me@oidc.example.org" must not hold user info`}},
		{"trailing slash", block("https://oidc.example.org/"), []string{
			`c.hcl:4: issuer: "https://oidc.example.org/" must not end with a slash (relying parties compare iss with it byte for byte)`}},
		{"dot segment", block("https://oidc.example.org/a/../b"), []string{
			`c.hcl:4: issuer: "https://oidc.example.org/a/../b" must have a clean path (no //, . or .. segments, no escapes)`}},
		{"not a URL", block("https://oidc example.org"), []string{`c.hcl:4: issuer: "https://oidc example.org" is not a URL`}},
		{"bad listen address", "oidc_discovery {\n  listen_address = \"8446\"\n  issuer = \"https://o.example.org\"\n}\n", []string{
			`c.hcl:5: listen_address: "8446" is not host:port`}},
		{"the agent API's port", "listen_address = \"0.0.0.0:8443\"\noidc_discovery {\n  listen_address = \"0.0.0.0:8443\"\n  issuer = \"https://o.example.org\"\n}\n", []string{
			`c.hcl:6: listen_address: "0.0.0.0:8443" is the signer's listen_address too: give OIDC discovery its own port`}},
		{"the metrics port", "metrics_address = \"127.0.0.1:9465\"\noidc_discovery {\n  listen_address = \"127.0.0.1:9465\"\n  issuer = \"https://o.example.org\"\n}\n", []string{
			`c.hcl:6: listen_address: "127.0.0.1:9465" is the signer's metrics_address too: give OIDC discovery its own port`}},
		{"tls without key_file", "oidc_discovery {\n  issuer = \"https://o.example.org\"\n  tls { cert_file = \"c.pem\" }\n}\n", []string{
			`c.hcl:6: Missing required argument: The argument "key_file" is required, but no definition was found.`}},
		{"empty cert_file", "oidc_discovery {\n  issuer = \"https://o.example.org\"\n  tls {\n    cert_file = \"\"\n    key_file = \"k.pem\"\n  }\n}\n", []string{
			`c.hcl:7: cert_file: must not be empty`}},
		{"unknown key", "oidc_discovery {\n  issuer = \"https://o.example.org\"\n  jwks_path = \"/jwks\"\n}\n", []string{
			`c.hcl:6: Unsupported argument: An argument named "jwks_path" is not expected here.`}},
		{"two blocks", block("https://a.example.org") + block("https://b.example.org"), []string{
			`c.hcl:5: only one oidc_discovery block is allowed (first at line 4)`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), "c.hcl")
			if cfg != nil {
				t.Errorf("ParseConfig returned a config along with errors")
			}
			var errs hclconf.Errors
			if !errors.As(err, &errs) {
				t.Fatalf("ParseConfig error = %v, want hclconf.Errors", err)
			}
			if diff := cmp.Diff(strings.Join(tt.want, "\n"), err.Error()); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}

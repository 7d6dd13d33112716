package signer

import (
	"net"
	"net/url"
	"path"
	"strings"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

// DefaultOIDCListenAddress is oidc_discovery's listen_address when the
// block leaves it out: loopback, for a TLS-terminating proxy in front.
const DefaultOIDCListenAddress = "127.0.0.1:8446"

// OIDCConfig is the oidc_discovery block: where the signer publishes the
// OIDC discovery document and JWKS that let clouds and Vault accept its
// JWT-SVIDs, and the issuer every JWT-SVID names. Unlike metrics_address,
// the listener may be public: it serves public keys only.
type OIDCConfig struct {
	ListenAddress string
	// Issuer is the https URL relying parties are told (no query,
	// fragment or trailing slash): the iss of every JWT-SVID and the base
	// of the discovery document's URL.
	Issuer string
	// CertFile and KeyFile are the HTTPS certificate and key (the tls
	// block): both empty means plain HTTP, for a TLS-terminating proxy.
	CertFile, KeyFile string
}

var oidcSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "listen_address"}, {Name: "issuer", Required: true}},
	Blocks:     []hcl.BlockHeaderSchema{{Type: "tls"}},
}

var oidcTLSSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "cert_file", Required: true}, {Name: "key_file", Required: true}},
}

// decodeOIDC decodes the oidc_discovery block, if any, into cfg.OIDC. It
// runs after listen_address and metrics_address are decoded, to refuse a
// listener shared with either.
func decodeOIDC(blocks hcl.Blocks, dir string, cfg *Config) hcl.Diagnostics {
	content, diags := hclconf.OneBlock(blocks, oidcSchema)
	if content == nil {
		return diags
	}
	o := &OIDCConfig{ListenAddress: DefaultOIDCListenAddress}
	if attr, ok := content.Attributes["listen_address"]; ok {
		addr, d := hclconf.HostPort(attr, true)
		diags = append(diags, d...)
		if !d.HasErrors() {
			for _, other := range []struct{ name, addr string }{{"listen_address", cfg.ListenAddress}, {"metrics_address", cfg.MetricsAddress}} {
				if addr == other.addr && !strings.HasSuffix(addr, ":0") {
					diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "listen_address: %q is the signer's %s too: give OIDC discovery its own port", addr, other.name))
				}
			}
			o.ListenAddress = addr
		}
	}
	if attr, ok := content.Attributes["issuer"]; ok {
		s, d := hclconf.NonEmptyString(attr)
		diags = append(diags, d...)
		if !d.HasErrors() {
			if msg := checkIssuer(s); msg != "" {
				diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "issuer: %q %s", s, msg))
			}
			o.Issuer = s
		}
	}
	tlsContent, d := hclconf.OneBlock(content.Blocks.OfType("tls"), oidcTLSSchema)
	diags = append(diags, d...)
	if tlsContent != nil {
		for name, dst := range map[string]*string{"cert_file": &o.CertFile, "key_file": &o.KeyFile} {
			if attr, ok := tlsContent.Attributes[name]; ok {
				var d hcl.Diagnostics
				*dst, d = hclconf.Path(attr, dir)
				diags = append(diags, d...)
			}
		}
	}
	cfg.OIDC = o
	return diags
}

// checkIssuer says what is wrong with issuer as an OIDC issuer, or "" when
// nothing is. Relying parties compare iss with the URL they were given
// byte for byte and fetch issuer + "/.well-known/openid-configuration", so
// only one spelling of a plain https URL can work: no query or fragment
// (the discovery spec forbids them), no user info, no trailing slash, a
// clean path. Plain http is accepted for loopback hosts only (tests, or a
// proxy on the same host), as no cloud or Vault accepts it elsewhere.
func checkIssuer(issuer string) string {
	u, err := url.Parse(issuer)
	if err != nil {
		return "is not a URL"
	}
	switch {
	case u.Scheme == "http" && isLoopbackHost(u.Hostname()):
	case u.Scheme != "https":
		return `must be an https:// URL (http:// only for localhost or a loopback IP)`
	}
	switch {
	case u.Host == "" || u.Hostname() == "":
		return "has no host"
	case u.Opaque != "":
		return "is not a URL with a host (write https://host/path)"
	case u.User != nil:
		return "must not hold user info"
	case u.RawQuery != "" || u.ForceQuery:
		return "must not have a query (relying parties append /.well-known/openid-configuration to it)"
	case u.Fragment != "" || strings.Contains(issuer, "#"):
		return "must not have a fragment"
	case strings.HasSuffix(u.Path, "/"):
		return "must not end with a slash (relying parties compare iss with it byte for byte)"
	case u.Path != "" && (path.Clean(u.Path) != u.Path || u.RawPath != ""):
		return "must have a clean path (no //, . or .. segments, no escapes)"
	}
	return ""
}

// isLoopbackHost reports whether host is "localhost" or a loopback IP.
func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

package signer

import (
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultBundleEndpointAddress is bundle_endpoint's listen_address when the
// block leaves it out: every address, as federated peers are other hosts.
const DefaultBundleEndpointAddress = "0.0.0.0:8445"

// Profiles of the SPIFFE Trust Domain and Bundle specification: how a
// bundle endpoint is authenticated.
const (
	// ProfileHTTPSSPIFFE: TLS with the endpoint's own X.509-SVID, checked
	// against the last good bundle of its trust domain.
	ProfileHTTPSSPIFFE = "https_spiffe"
	// ProfileHTTPSWeb: TLS with a Web PKI certificate.
	ProfileHTTPSWeb = "https_web"
)

// minRefreshHint is the shortest refresh hint the signer serves or obeys:
// shorter would only load both endpoints (SPIRE's own floor is a minute).
const minRefreshHint = 10 * time.Second

// BundleEndpointConfig is the bundle_endpoint block: where the signer
// serves its trust bundle to federated trust domains.
type BundleEndpointConfig struct {
	ListenAddress string
	// RefreshHint is the spiffe_refresh_hint served; 0 means
	// defaultRefreshHint(ca_publish_lead).
	RefreshHint time.Duration
	// CertFile and KeyFile (the tls block) make the profile https_web
	// with that certificate; both empty means https_spiffe with the
	// signer's own SVID.
	CertFile, KeyFile string
}

// Profile is the endpoint's profile: https_web with a tls block, else
// https_spiffe.
func (b *BundleEndpointConfig) Profile() string {
	if b.CertFile != "" {
		return ProfileHTTPSWeb
	}
	return ProfileHTTPSSPIFFE
}

// FederationConfig is one federation block: a trust domain whose bundle
// the signer fetches and pushes to the agents whose entries federate with
// it.
type FederationConfig struct {
	TrustDomain spiffeid.TrustDomain // the block's label
	URL         string               // bundle_endpoint_url, https
	Profile     string               // ProfileHTTPSSPIFFE or ProfileHTTPSWeb
	// EndpointID is the SPIFFE ID the endpoint must present (https_spiffe
	// only); it is a member of TrustDomain, whose last good bundle
	// authenticates it.
	EndpointID spiffeid.ID
	// BootstrapBundle is the file of what to trust before the first
	// fetch (PEM CAs or SPIFFE bundle JSON); "" when not set. With
	// https_spiffe it is needed unless a fetched bundle was saved before,
	// which New checks.
	BootstrapBundle string
	// CAFile holds the roots that authenticate an https_web endpoint
	// instead of the system's; "" means the system roots.
	CAFile string
}

var bundleEndpointSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "listen_address"}, {Name: "refresh_hint"}},
	Blocks:     []hcl.BlockHeaderSchema{{Type: "tls"}},
}

var federationSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "bundle_endpoint_url", Required: true},
		{Name: "profile", Required: true},
		{Name: "endpoint_spiffe_id"},
		{Name: "bootstrap_bundle"},
		{Name: "ca_file"},
	},
}

// decodeBundleEndpoint decodes the bundle_endpoint block, if any, into
// cfg.BundleEndpoint. It runs after the other listeners are decoded, to
// refuse an address shared with one of them.
func decodeBundleEndpoint(blocks hcl.Blocks, dir string, cfg *Config) hcl.Diagnostics {
	content, diags := hclconf.OneBlock(blocks, bundleEndpointSchema)
	if content == nil {
		return diags
	}
	b := &BundleEndpointConfig{ListenAddress: DefaultBundleEndpointAddress}
	if attr, ok := content.Attributes["listen_address"]; ok {
		addr, d := hclconf.HostPort(attr, true)
		diags = append(diags, d...)
		if !d.HasErrors() {
			others := []struct{ name, addr string }{{"listen_address", cfg.ListenAddress}, {"metrics_address", cfg.MetricsAddress}}
			if cfg.OIDC != nil {
				others = append(others, struct{ name, addr string }{"oidc_discovery listen_address", cfg.OIDC.ListenAddress})
			}
			for _, other := range others {
				if addr == other.addr && !strings.HasSuffix(addr, ":0") {
					diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "listen_address: %q is the signer's %s too: give the bundle endpoint its own port", addr, other.name))
				}
			}
			b.ListenAddress = addr
		}
	}
	if attr, ok := content.Attributes["refresh_hint"]; ok {
		var d hcl.Diagnostics
		b.RefreshHint, d = hclconf.Duration(attr, minRefreshHint)
		diags = append(diags, d...)
	}
	tlsContent, d := hclconf.OneBlock(content.Blocks.OfType("tls"), oidcTLSSchema)
	diags = append(diags, d...)
	if tlsContent != nil {
		for name, dst := range map[string]*string{"cert_file": &b.CertFile, "key_file": &b.KeyFile} {
			if attr, ok := tlsContent.Attributes[name]; ok {
				var d hcl.Diagnostics
				*dst, d = hclconf.Path(attr, dir)
				diags = append(diags, d...)
			}
		}
	}
	cfg.BundleEndpoint = b
	return diags
}

// decodeFederations decodes the federation blocks into cfg.Federations.
// It runs after trust_domain is decoded, to refuse federating with it.
func decodeFederations(blocks hcl.Blocks, dir string, cfg *Config) hcl.Diagnostics {
	var diags hcl.Diagnostics
	seen := map[string]int{}
	for _, b := range blocks {
		f, d := decodeFederation(b, dir, cfg.TrustDomain)
		diags = append(diags, d...)
		label := b.Labels[0]
		if first, dup := seen[label]; dup {
			diags = append(diags, hclconf.Errorf(b.LabelRanges[0], "duplicate federation %q (first defined at line %d)", label, first))
			continue
		}
		seen[label] = b.DefRange.Start.Line
		if !d.HasErrors() {
			cfg.Federations = append(cfg.Federations, f)
		}
	}
	return diags
}

func decodeFederation(b *hcl.Block, dir string, own spiffeid.TrustDomain) (FederationConfig, hcl.Diagnostics) {
	label, lrng := b.Labels[0], b.LabelRanges[0]
	f := FederationConfig{}
	content, diags := b.Body.Content(federationSchema)
	td, err := spiffeid.TrustDomainFromString(label)
	switch {
	case err != nil || td.Name() != label:
		msg := "not a trust domain name"
		if err != nil {
			msg = err.Error()
		}
		diags = append(diags, hclconf.Errorf(lrng, "federation %q: the label must be a trust domain name such as \"other.org\": %s", label, msg))
	case td == own:
		diags = append(diags, hclconf.Errorf(lrng, "federation %q: that is this signer's own trust domain", label))
	}
	f.TrustDomain = td
	if attr, ok := content.Attributes["bundle_endpoint_url"]; ok {
		s, d := hclconf.NonEmptyString(attr)
		diags = append(diags, d...)
		if !d.HasErrors() {
			if msg := checkEndpointURL(s); msg != "" {
				diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "bundle_endpoint_url: %q %s", s, msg))
			}
			f.URL = s
		}
	}
	if attr, ok := content.Attributes["profile"]; ok {
		var d hcl.Diagnostics
		f.Profile, d = hclconf.OneOf(attr, ProfileHTTPSSPIFFE, ProfileHTTPSWeb)
		diags = append(diags, d...)
	}
	paths := map[string]*string{"bootstrap_bundle": &f.BootstrapBundle, "ca_file": &f.CAFile}
	for _, name := range []string{"bootstrap_bundle", "ca_file"} {
		if attr, ok := content.Attributes[name]; ok {
			var d hcl.Diagnostics
			*paths[name], d = hclconf.Path(attr, dir)
			diags = append(diags, d...)
		}
	}
	idAttr, hasID := content.Attributes["endpoint_spiffe_id"]
	switch f.Profile {
	case ProfileHTTPSSPIFFE:
		if !hasID {
			diags = append(diags, hclconf.Errorf(b.Body.MissingItemRange(), `federation %q: profile "https_spiffe" needs endpoint_spiffe_id: the SPIFFE ID the endpoint presents (spiffe://%s/lanyard/signer for a Lanyard signer, spiffe://%s/spire/server for SPIRE)`, label, label, label))
		}
		if attr, ok := content.Attributes["ca_file"]; ok {
			diags = append(diags, hclconf.Errorf(attr.NameRange, `ca_file: only for profile "https_web"; an https_spiffe endpoint is authenticated by its trust domain's bundle (bootstrap_bundle, then each fetched one)`))
		}
	case ProfileHTTPSWeb:
		if hasID {
			diags = append(diags, hclconf.Errorf(idAttr.NameRange, `endpoint_spiffe_id: only for profile "https_spiffe"; an https_web endpoint is authenticated by its Web PKI certificate`))
			hasID = false
		}
	}
	if hasID {
		s, d := hclconf.NonEmptyString(idAttr)
		diags = append(diags, d...)
		if !d.HasErrors() {
			id, err := spiffeid.FromString(s)
			switch {
			case err != nil:
				diags = append(diags, hclconf.Errorf(idAttr.Expr.Range(), "endpoint_spiffe_id: %q: %v", s, err))
			case !td.IsZero() && !id.MemberOf(td):
				// Only that domain's bundle is known to authenticate it.
				diags = append(diags, hclconf.Errorf(idAttr.Expr.Range(), "endpoint_spiffe_id: %q is not in trust domain %q, whose bundle authenticates the endpoint", s, label))
			}
			f.EndpointID = id
		}
	}
	return f, diags
}

// checkEndpointURL says what is wrong with a bundle_endpoint_url, or ""
// when nothing is: both profiles are HTTPS (the specification has no
// plain-HTTP profile).
func checkEndpointURL(s string) string {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return "is not a URL"
	case u.Scheme != "https":
		return "must be an https:// URL (both profiles are TLS)"
	case u.Hostname() == "":
		return "has no host"
	case u.User != nil:
		return "must not hold user info"
	case u.Fragment != "":
		return "must not have a fragment"
	}
	return ""
}

// federation returns the federation block of td, or nil.
func (c *Config) federation(td spiffeid.TrustDomain) *FederationConfig {
	i := slices.IndexFunc(c.Federations, func(f FederationConfig) bool { return f.TrustDomain == td })
	if i < 0 {
		return nil
	}
	return &c.Federations[i]
}

// defaultRefreshHint is the spiffe_refresh_hint served when
// bundle_endpoint sets none. A relying party refetches at most a hint
// after its last fetch, and a new CA or JWT key is in the bundle
// ca_publish_lead before it signs: a hint of at most half that lead lets
// it see every new key before a peer presents anything signed by it, with
// half the lead to spare for a failed fetch and its retry. The 5-minute
// cap keeps removals and rotations prompt with long leads (4h by
// default); the floor spares both sides with very short test leads.
func defaultRefreshHint(lead time.Duration) time.Duration {
	return max(min(5*time.Minute, lead/2), minRefreshHint)
}

// refreshHint is the hint this signer's bundle endpoint serves.
func (b *BundleEndpointConfig) refreshHint(lead time.Duration) time.Duration {
	if b.RefreshHint > 0 {
		return b.RefreshHint
	}
	return defaultRefreshHint(lead)
}

// String names the endpoint in errors and logs.
func (f *FederationConfig) String() string {
	return fmt.Sprintf("federation %s (%s, %s)", f.TrustDomain.Name(), f.URL, f.Profile)
}

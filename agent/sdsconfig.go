package agent

import (
	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/zclconf/go-cty/cty"
)

// SDSConfig is the optional sds block of the agent config: the names
// under which Envoy's SDS finds the caller's SVID and the bundles, as in
// SPIRE's agent config, so that an Envoy bootstrap written for SPIRE works
// unchanged (README "Envoy (SDS)").
type SDSConfig struct {
	DefaultSVIDName             string
	DefaultBundleName           string
	DefaultAllBundlesName       string
	DisableSPIFFECertValidation bool
}

// DefaultSDS is the sds block when the file has none: SPIRE's names.
func DefaultSDS() SDSConfig {
	return SDSConfig{
		DefaultSVIDName:       workloadapi.DefaultSDSSVIDName,
		DefaultBundleName:     workloadapi.DefaultSDSBundleName,
		DefaultAllBundlesName: workloadapi.DefaultSDSAllBundlesName,
	}
}

var agentSDSSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "default_svid_name"},
		{Name: "default_bundle_name"},
		{Name: "default_all_bundles_name"},
		{Name: "disable_spiffe_cert_validation"},
	},
}

// decodeSDS reads the optional sds block; absent keys keep their
// defaults. The three names must be distinct: one name cannot be both
// a certificate and a validation context.
func decodeSDS(blocks hcl.Blocks, out *SDSConfig) hcl.Diagnostics {
	*out = DefaultSDS()
	content, diags := hclconf.OneBlock(blocks, agentSDSSchema)
	if content == nil {
		return diags
	}
	names := []struct {
		key string
		dst *string
	}{
		{"default_svid_name", &out.DefaultSVIDName},
		{"default_bundle_name", &out.DefaultBundleName},
		{"default_all_bundles_name", &out.DefaultAllBundlesName},
	}
	seen := map[string]string{} // name -> the key that set it
	for _, n := range names {
		a, ok := content.Attributes[n.key]
		if ok {
			v, d := hclconf.NonEmptyString(a)
			diags = append(diags, d...)
			if d.HasErrors() {
				continue
			}
			*n.dst = v
		}
		if other, dup := seen[*n.dst]; dup {
			rng := content.Attributes[n.key]
			if rng == nil {
				rng = content.Attributes[other]
			}
			diags = append(diags, hclconf.Errorf(rng.Expr.Range(), "sds: %s and %s are both %q; the names must differ", other, n.key, *n.dst))
			continue
		}
		seen[*n.dst] = n.key
	}
	if a, ok := content.Attributes["disable_spiffe_cert_validation"]; ok {
		v, d := decodeBool(a)
		diags = append(diags, d...)
		if !d.HasErrors() {
			out.DisableSPIFFECertValidation = v
		}
	}
	return diags
}

// decodeBool decodes attr as true or false; a string such as "true" is
// refused, as hclconf refuses a number where a string belongs.
func decodeBool(attr *hcl.Attribute) (bool, hcl.Diagnostics) {
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() {
		return false, diags
	}
	if !v.IsKnown() || v.IsNull() || v.Type() != cty.Bool {
		return false, hcl.Diagnostics{hclconf.Errorf(attr.Expr.Range(), "%s: expected true or false, got %s", attr.Name, v.Type().FriendlyName())}
	}
	return v.True(), nil
}

// workloadSDS is the Workload API server's view of the block.
func (c *Config) workloadSDS() workloadapi.SDSConfig {
	return workloadapi.SDSConfig{
		TrustDomain:                 c.TrustDomain,
		DefaultSVIDName:             c.SDS.DefaultSVIDName,
		DefaultBundleName:           c.SDS.DefaultBundleName,
		DefaultAllBundlesName:       c.SDS.DefaultAllBundlesName,
		DisableSPIFFECertValidation: c.SDS.DisableSPIFFECertValidation,
	}
}

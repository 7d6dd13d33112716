package agent

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseConfigSDS(t *testing.T) {
	const base = "trust_domain = \"example.org\"\nsigner_address = \"s:1\"\ntrust_bundle_path = \"b.pem\"\ntpm { socket = \"tpm.sock\" }\n"
	tests := []struct {
		name string
		src  string
		want SDSConfig
		errs []string
	}{
		{name: "defaults", src: base, want: SDSConfig{DefaultSVIDName: "default", DefaultBundleName: "ROOTCA", DefaultAllBundlesName: "ALL"}},
		{name: "empty block", src: base + "sds {}\n", want: DefaultSDS()},
		{name: "every key", src: base + "sds {\n  default_svid_name = \"svid\"\n  default_bundle_name = \"bundle\"\n  default_all_bundles_name = \"every\"\n  disable_spiffe_cert_validation = true\n}\n",
			want: SDSConfig{DefaultSVIDName: "svid", DefaultBundleName: "bundle", DefaultAllBundlesName: "every", DisableSPIFFECertValidation: true}},
		{name: "names swapped", src: base + "sds {\n  default_bundle_name = \"ALL\"\n  default_all_bundles_name = \"ROOTCA\"\n}\n",
			want: SDSConfig{DefaultSVIDName: "default", DefaultBundleName: "ALL", DefaultAllBundlesName: "ROOTCA"}},
		{name: "name clashes with a default", src: base + "sds {\n  default_svid_name = \"ROOTCA\"\n}\n",
			errs: []string{`a.hcl:6: sds: default_svid_name and default_bundle_name are both "ROOTCA"; the names must differ`}},
		{name: "two names equal", src: base + "sds {\n  default_bundle_name = \"ca\"\n  default_all_bundles_name = \"ca\"\n}\n",
			errs: []string{`a.hcl:7: sds: default_bundle_name and default_all_bundles_name are both "ca"; the names must differ`}},
		{name: "empty name", src: base + "sds {\n  default_svid_name = \"\"\n}\n",
			errs: []string{`a.hcl:6: default_svid_name: must not be empty`}},
		{name: "not a bool", src: base + "sds {\n  disable_spiffe_cert_validation = \"yes\"\n}\n",
			errs: []string{`a.hcl:6: disable_spiffe_cert_validation: expected true or false, got string`}},
		{name: "unknown key", src: base + "sds {\n  default_name = \"x\"\n}\n",
			errs: []string{`a.hcl:6: Unsupported argument: An argument named "default_name" is not expected here.`}},
		{name: "two blocks", src: base + "sds {}\nsds {}\n",
			errs: []string{"a.hcl:6: only one sds block is allowed (first at line 5)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := parseConfigCase(t, tt.src, tt.errs)
			if cfg == nil {
				return
			}
			if diff := cmp.Diff(tt.want, cfg.SDS); diff != "" {
				t.Errorf("sds (-want +got):\n%s", diff)
			}
			if got := cfg.workloadSDS(); got.TrustDomain != cfg.TrustDomain || got.DefaultBundleName != tt.want.DefaultBundleName {
				t.Errorf("workloadSDS = %+v, want the trust domain and the names", got)
			}
		})
	}
}

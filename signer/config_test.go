package signer

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestLoadConfigTestdata(t *testing.T) {
	dir, err := filepath.Abs(filepath.Join("..", "testdata", "config"))
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	tests := []struct {
		file string
		want *Config
	}{
		{"signer.hcl", &Config{
			TrustDomain:   td,
			ListenAddress: "0.0.0.0:9443",
			PolicyPath:    filepath.Join(dir, "..", "policy", "valid.hcl"),
			BundlePath:    filepath.Join(dir, "bundle.pem"),
			StateDir:      "/tmp/lanyard-signer-state",
			CATTL:         48 * time.Hour,
			X509MaxTTL:    12 * time.Hour,
			AgentTTL:      30 * time.Minute,
			LogLevel:      "debug",
			LogFormat:     "json",
		}},
		{"signer-minimal.hcl", &Config{
			TrustDomain:   td,
			ListenAddress: "127.0.0.1:8443",
			PolicyPath:    "/etc/lanyard/policy.hcl",
			BundlePath:    filepath.Join(dir, "bundle.pem"),
			StateDir:      "/var/lib/lanyard-signer",
			CATTL:         24 * time.Hour,
			X509MaxTTL:    24 * time.Hour,
			AgentTTL:      time.Hour,
			LogLevel:      "info",
			LogFormat:     "text",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			// A relative config path must still give absolute paths.
			got, err := LoadConfig(filepath.Join("..", "testdata", "config", tt.file))
			if err != nil {
				t.Fatalf("LoadConfig: %v", err)
			}
			if diff := cmp.Diff(tt.want, got, cmpopts.EquateComparable(spiffeid.TrustDomain{})); diff != "" {
				t.Errorf("LoadConfig (-want +got):\n%s", diff)
			}
		})
	}
}

func TestLoadConfigUnreadable(t *testing.T) {
	_, err := LoadConfig(filepath.Join(t.TempDir(), "missing.hcl"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadConfig error = %v, want fs.ErrNotExist", err)
	}
}

func TestParseConfigErrors(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n" // lines 1-3
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"empty file", "", []string{
			`c.hcl:1: Missing required argument: The argument "trust_domain" is required, but no definition was found.`,
			`c.hcl:1: Missing required argument: The argument "policy_path" is required, but no definition was found.`,
			`c.hcl:1: Missing required argument: The argument "bundle_path" is required, but no definition was found.`,
		}},
		{"unknown key", required + "listen = \"x\"\n", []string{
			`c.hcl:4: Unsupported argument: An argument named "listen" is not expected here.`,
		}},
		{"unknown block", required + "tpm {}\n", []string{
			`c.hcl:4: Unsupported block type: Blocks of type "tpm" are not expected here.`,
		}},
		{"syntax error", required + "ca_ttl = \n", []string{
			`c.hcl:4: Invalid expression: Expected the start of an expression, but found an invalid expression token.`,
		}},
		{"bad trust domain", "trust_domain = \"spiffe://Example.org\"\npolicy_path = \"p\"\nbundle_path = \"b\"\n", []string{
			`c.hcl:1: trust_domain: "spiffe://Example.org": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`,
		}},
		{"wrong type", required + "listen_address = 8443\n", []string{
			`c.hcl:4: listen_address: expected a string, got number`,
		}},
		{"bad listen address", required + "listen_address = \"localhost\"\n", []string{
			`c.hcl:4: listen_address: "localhost" is not host:port`,
		}},
		{"empty policy path", "trust_domain = \"example.org\"\npolicy_path = \"\"\nbundle_path = \"b\"\n", []string{
			`c.hcl:2: policy_path: must not be empty`,
		}},
		{"ca_ttl below a minute", required + "ca_ttl = \"59s\"\n", []string{
			`c.hcl:4: ca_ttl: 59s is below the minimum of 1m0s`,
		}},
		{"agent_ttl below 10s", required + "agent_ttl = \"5s\"\n", []string{
			`c.hcl:4: agent_ttl: 5s is below the minimum of 10s`,
		}},
		{"x509_max_ttl unparsable", required + "x509_max_ttl = \"one day\"\n", []string{
			`c.hcl:4: x509_max_ttl: invalid duration "one day" (write it like "90s", "5m" or "1h")`,
		}},
		{"TTLs longer than the CA", required + "ca_ttl = \"2h\"\nx509_max_ttl = \"3h\"\nagent_ttl = \"2h1m\"\n", []string{
			`c.hcl:5: x509_max_ttl: 3h0m0s is longer than ca_ttl (2h0m0s)`,
			`c.hcl:6: agent_ttl: 2h1m0s is longer than ca_ttl (2h0m0s)`,
		}},
		{"bad log settings", required + "log_level = \"verbose\"\nlog_format = \"xml\"\n", []string{
			`c.hcl:4: log_level: "verbose" is not one of trace, debug, info, warn, error`,
			`c.hcl:5: log_format: "xml" is not one of text, json`,
		}},
		{"every problem at once", "trust_domain = \"\"\nbundle_path = 1\nstate_dir = \"\"\nca_ttl = \"1s\"\nx = 1\n", []string{
			`c.hcl:1: Missing required argument: The argument "policy_path" is required, but no definition was found.`,
			`c.hcl:1: trust_domain: must not be empty`,
			`c.hcl:2: bundle_path: expected a string, got number`,
			`c.hcl:3: state_dir: must not be empty`,
			`c.hcl:4: ca_ttl: 1s is below the minimum of 1m0s`,
			`c.hcl:5: Unsupported argument: An argument named "x" is not expected here.`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(tt.src), "c.hcl")
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

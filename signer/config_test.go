package signer

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

func TestLoadConfigTestdata(t *testing.T) {
	dir, err := filepath.Abs(filepath.Join("..", "testdata", "config"))
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	// withDefaults is a config of every default (bundle.pem next to the
	// file), changed by f.
	withDefaults := func(f func(*Config)) *Config {
		c := &Config{
			TrustDomain: td, ListenAddress: "127.0.0.1:8443", BundlePath: filepath.Join(dir, "bundle.pem"),
			StateDir: "/var/lib/lanyard-signer", AdminSocketPath: DefaultAdminSocketPath,
			CATTL: 24 * time.Hour, CAPublishLead: 4 * time.Hour, X509MaxTTL: 12 * time.Hour, AgentTTL: time.Hour, JWTMaxTTL: time.Hour,
			LogLevel: "info", LogFormat: "text", KeyStorage: KeyStorageMemory, Limits: DefaultLimits(),
		}
		f(c)
		return c
	}
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
			// Relative to the file, like every path.
			AdminSocketPath: filepath.Join(dir, "admin", "admin.sock"),
			CATTL:           48 * time.Hour,
			CAPublishLead:   8 * time.Hour,
			X509MaxTTL:      12 * time.Hour,
			AgentTTL:        30 * time.Minute,
			JWTMaxTTL:       time.Hour,
			LogLevel:        "debug",
			LogFormat:       "json",
			KeyStorage:      KeyStorageMemory,
			ReplicaName:     host,
			Limits: func() Limits {
				l := DefaultLimits()
				l.AttestFirstMessageTimeout = 2 * time.Second
				l.MaxPendingAttestations = 512
				l.MaxSyncStreamsPerAgent = 3
				l.JWTMintsPerSecond = 50
				return l
			}(),
			OIDC: &OIDCConfig{ListenAddress: "0.0.0.0:8446", Issuer: "https://oidc.example.org",
				CertFile: filepath.Join(dir, "tls", "oidc.pem"), KeyFile: filepath.Join(dir, "tls", "oidc-key.pem")},
		}},
		{"signer-minimal.hcl", withDefaults(func(c *Config) {
			c.PolicyPath, c.ReplicaName = "/etc/lanyard/policy.hcl", host
		})},
		{"signer-tier.hcl", withDefaults(func(c *Config) {
			c.ReplicaName = "signer-2"
			c.Etcd = &EtcdConfig{
				Endpoints: []string{"https://10.0.0.1:2379", "https://10.0.0.2:2379"},
				Prefix:    "/lanyard/example.org",
				CAFile:    filepath.Join(dir, "etcd", "ca.pem"),
				CertFile:  filepath.Join(dir, "etcd", "client.pem"),
				KeyFile:   filepath.Join(dir, "etcd", "client-key.pem"),
			}
		})},
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
			`c.hcl:1: Missing required argument: The argument "bundle_path" is required, but no definition was found.`,
			`c.hcl:1: Missing required argument: The argument "policy_path" is required, but no definition was found (or add an etcd block, whose replicas share the policy).`,
		}},
		{"unknown key", required + "listen = \"x\"\n", []string{
			`c.hcl:4: Unsupported argument: An argument named "listen" is not expected here.`,
		}},
		{"unknown block", required + "vault {}\n", []string{
			`c.hcl:4: Unsupported block type: Blocks of type "vault" are not expected here.`,
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
		{"metrics on a public address", required + "metrics_address = \"10.0.0.1:9465\"\n", []string{
			`c.hcl:4: metrics_address: "10.0.0.1:9465": host must be a loopback address such as 127.0.0.1 or [::1] (the endpoint has no authentication)`,
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
		{"TTLs longer than half the CA", required + "ca_ttl = \"2h\"\nx509_max_ttl = \"1h0m1s\"\nagent_ttl = \"2h1m\"\n", []string{
			`c.hcl:5: x509_max_ttl: 1h0m1s is longer than ca_ttl/2 (1h0m0s)`,
			`c.hcl:6: agent_ttl: 2h1m0s is longer than ca_ttl/2 (1h0m0s)`,
		}},
		{"jwt_max_ttl below 10s", required + "jwt_max_ttl = \"9s\"\n", []string{
			`c.hcl:4: jwt_max_ttl: 9s is below the minimum of 10s`,
		}},
		{"jwt_max_ttl unparsable", required + "jwt_max_ttl = \"an hour\"\n", []string{
			`c.hcl:4: jwt_max_ttl: invalid duration "an hour" (write it like "90s", "5m" or "1h")`,
		}},
		{"jwt_max_ttl longer than half the CA", required + "ca_ttl = \"1h\"\njwt_max_ttl = \"31m\"\n", []string{
			`c.hcl:5: jwt_max_ttl: 31m0s is longer than ca_ttl/2 (30m0s)`,
		}},
		{"x509_max_ttl above half the default ca_ttl", required + "x509_max_ttl = \"24h\"\n", []string{
			`c.hcl:4: x509_max_ttl: 24h0m0s is longer than ca_ttl/2 (12h0m0s)`,
		}},
		{"publish lead longer than a quarter of the CA", required + "ca_ttl = \"1m\"\nca_publish_lead = \"16s\"\n", []string{
			`c.hcl:5: ca_publish_lead: 16s is longer than ca_ttl/4 (15s)`,
		}},
		{"publish lead below a second", required + "ca_publish_lead = \"500ms\"\n", []string{
			`c.hcl:4: ca_publish_lead: 500ms is below the minimum of 1s`,
		}},
		{"publish lead unparsable", required + "ca_publish_lead = 60\n", []string{
			`c.hcl:4: ca_publish_lead: expected a string, got number`,
		}},
		{"bad log settings", required + "log_level = \"verbose\"\nlog_format = \"xml\"\n", []string{
			`c.hcl:4: log_level: "verbose" is not one of trace, debug, info, warn, error`,
			`c.hcl:5: log_format: "xml" is not one of text, json`,
		}},
		{"negative duration", required + "ca_ttl = \"-1h\"\n", []string{
			`c.hcl:4: ca_ttl: -1h is below the minimum of 1m0s`,
		}},
		{"null value", required + "ca_ttl = null\n", []string{
			`c.hcl:4: ca_ttl: must not be null`,
		}},
		{"key set twice", required + "state_dir = \"a\"\nstate_dir = \"b\"\n", []string{
			`c.hcl:5: Attribute redefined: The argument "state_dir" was already set at c.hcl:4,1-10. Each argument may be set only once.`,
		}},
		{"port out of range", required + "listen_address = \"127.0.0.1:99999\"\n", []string{
			`c.hcl:4: listen_address: "127.0.0.1:99999": port must be a number from 1 to 65535`,
		}},
		{"named port", required + "listen_address = \"127.0.0.1:http\"\n", []string{
			`c.hcl:4: listen_address: "127.0.0.1:http": port must be a number from 1 to 65535`,
		}},
		{"etcd block errors", "trust_domain = \"example.org\"\nbundle_path = \"b.pem\"\netcd {\n  endpoints = [\"127.0.0.1:2379\", \"http://a:1\", \"http://a:1\", \"http://b\"]\n  prefix = \"lanyard/\"\n  tls { cert_file = \"c.pem\" }\n}\netcd {\n  endpoints = []\n  prefix = \"/x\"\n}\nreplica_name = \"-bad name\"\n", []string{
			`c.hcl:3: etcd tls: cert_file and key_file go together (the client certificate and its key)`,
			`c.hcl:3: etcd: a tls block with http:// endpoints: use https:// endpoints`,
			`c.hcl:4: endpoints: "127.0.0.1:2379" is not an etcd client URL (http:// or https://host:port)`,
			`c.hcl:4: endpoints: "http://a:1" is listed twice`,
			`c.hcl:4: endpoints: "http://b" is not an etcd client URL (http:// or https://host:port)`,
			`c.hcl:5: prefix: "lanyard/" is not an absolute key path without a trailing slash, e.g. "/lanyard/example.org"`,
			`c.hcl:8: only one etcd block is allowed (first at line 3)`,
			`c.hcl:12: replica_name: "-bad name": use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit`,
		}},
		{"every problem at once", "trust_domain = \"\"\nbundle_path = 1\nstate_dir = \"\"\nca_ttl = \"1s\"\nx = 1\n", []string{
			`c.hcl:1: trust_domain: must not be empty`,
			`c.hcl:1: Missing required argument: The argument "policy_path" is required, but no definition was found (or add an etcd block, whose replicas share the policy).`,
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

func TestParseConfigCADerived(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n"
	tests := []struct {
		name                       string
		src                        string
		lead, x509MaxTTL, agentTTL time.Duration
		jwtMaxTTL                  time.Duration
	}{
		{"defaults", "", 4 * time.Hour, 12 * time.Hour, time.Hour, time.Hour},
		{"one minute CA shortens the defaults", "ca_ttl = \"1m\"\n", 10 * time.Second, 30 * time.Second, 30 * time.Second, 30 * time.Second},
		{"long CA keeps the TTL defaults", "ca_ttl = \"720h\"\n", 120 * time.Hour, 12 * time.Hour, time.Hour, time.Hour},
		{"set at the limits", "ca_ttl = \"1m\"\nca_publish_lead = \"15s\"\nx509_max_ttl = \"30s\"\nagent_ttl = \"30s\"\njwt_max_ttl = \"30s\"\n",
			15 * time.Second, 30 * time.Second, 30 * time.Second, 30 * time.Second},
		{"set lead", "ca_publish_lead = \"1h\"\n", time.Hour, 12 * time.Hour, time.Hour, time.Hour},
		{"set jwt_max_ttl", "jwt_max_ttl = \"5m\"\n", 4 * time.Hour, 12 * time.Hour, time.Hour, 5 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), "c.hcl")
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			got := [4]time.Duration{cfg.CAPublishLead, cfg.X509MaxTTL, cfg.AgentTTL, cfg.JWTMaxTTL}
			if want := [4]time.Duration{tt.lead, tt.x509MaxTTL, tt.agentTTL, tt.jwtMaxTTL}; got != want {
				t.Errorf("ca_publish_lead, x509_max_ttl, agent_ttl, jwt_max_ttl = %v, want %v", got, want)
			}
		})
	}
}

func TestKeyStorageConfig(t *testing.T) {
	required := "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n"
	tests := []struct {
		name    string
		src     string
		storage string
		tpm     string // device or socket
		err     string
	}{
		{"no tpm block: memory", "", KeyStorageMemory, "", ""},
		{"tpm block: tpm", "tpm { device = \"/dev/tpmrm0\" }\n", KeyStorageTPM, "/dev/tpmrm0", ""},
		{"tpm socket", "tpm { socket = \"/run/swtpm/signer.sock\" }\n", KeyStorageTPM, "/run/swtpm/signer.sock", ""},
		{"memory with a tpm block", "key_storage = \"memory\"\ntpm { device = \"/dev/tpmrm0\" }\n", KeyStorageMemory, "/dev/tpmrm0", ""},
		{"tpm without a block", "key_storage = \"tpm\"\n", "", "", `c.hcl:4: key_storage: "tpm" needs a tpm block`},
		{"unknown storage", "key_storage = \"disk\"\n", "", "", `c.hcl:4: key_storage: "disk" is not one of tpm, memory`},
		{"tpm tuning is the agent's", "tpm {\n  device = \"/dev/tpmrm0\"\n  probe_interval = \"1s\"\n}\n", "", "", `c.hcl:6: Unsupported argument`},
		{"both", "tpm {\n  device = \"/dev/tpmrm0\"\n  socket = \"/s\"\n}\n", "", "", `c.hcl:6: tpm: set device or socket, not both`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), "c.hcl")
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ParseConfig error = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.KeyStorage != tt.storage || cfg.TPM.Device+cfg.TPM.Socket != tt.tpm {
				t.Errorf("key_storage %q tpm %+v, want %q %q", cfg.KeyStorage, cfg.TPM, tt.storage, tt.tpm)
			}
		})
	}
}

package signer

import (
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/internal/tpmconf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults of the signer config, as documented in the README.
const (
	DefaultListenAddress = "127.0.0.1:8443"
	DefaultStateDir      = "/var/lib/lanyard-signer"
	// DefaultAdminSocketPath is the root-only admin socket, in the
	// runtime directory systemd gives the signer (RuntimeDirectory=).
	DefaultAdminSocketPath = "/run/lanyard-signer/admin.sock"
	DefaultCATTL           = 24 * time.Hour
	DefaultX509MaxTTL      = 12 * time.Hour // or ca_ttl/2 when that is shorter
	DefaultAgentTTL        = time.Hour      // or ca_ttl/2 when that is shorter
	DefaultJWTMaxTTL       = time.Hour      // or ca_ttl/2 when that is shorter
)

// DefaultCAPublishLead is ca_publish_lead when the file leaves it out: a
// sixth of ca_ttl (4h for the default 24h CA).
func DefaultCAPublishLead(caTTL time.Duration) time.Duration { return caTTL / 6 }

// Floors of the signer config: below them the CA or the agents would spend
// their time rotating.
const (
	minCATTL        = time.Minute
	minX509MaxTTL   = 10 * time.Second
	minAgentSVIDTTL = 10 * time.Second
	minJWTMaxTTL    = 10 * time.Second
	minPublishLead  = time.Second
)

// Config is the signer's validated configuration file. Paths in it are
// absolute: relative ones in the file are resolved against its directory.
type Config struct {
	TrustDomain   spiffeid.TrustDomain
	ListenAddress string
	PolicyPath    string
	BundlePath    string // where the signer writes its trust bundle (PEM)
	StateDir      string // public state, and keys usable only by this host's TPM; never a usable private key
	// AdminSocketPath is the root-only admin socket of `lanyard-signer
	// status` and `node ...`; empty (only in configs built in code, tests)
	// means none.
	AdminSocketPath string
	CATTL           time.Duration // lifetime of each CA
	CAPublishLead   time.Duration // how long a new CA is in the bundle before it signs
	X509MaxTTL      time.Duration // workload X.509-SVID TTLs are capped to this
	JWTMaxTTL       time.Duration // workload JWT-SVID TTLs (jwt_ttl) are capped to this
	AgentTTL        time.Duration // lifetime of agent SVIDs
	LogLevel        string        // trace, debug, info, warn or error
	LogFormat       string        // text or json
	// MetricsAddress is the loopback host:port serving Prometheus
	// metrics on /metrics; empty (the default) means off.
	MetricsAddress string
	// Limits is the file's limits block over DefaultLimits.
	Limits Limits
	// TPM is the signer host's TPM (the tpm block), which protects the
	// CA and JWT keys at rest; zero when the file has no tpm block.
	TPM node.TPMConfig
	// KeyStorage is where the CA and JWT private keys live between runs:
	// KeyStorageTPM (sealed to TPM, the default with a tpm block) or
	// KeyStorageMemory (nowhere: a restart makes new ones).
	KeyStorage string
	// ReplicaName names this replica in a tier (replica_name, default the
	// hostname): its key in etcd, in node list and in logs.
	ReplicaName string
	// Etcd is the etcd block: nil for a lone signer (state in state_dir,
	// policy in policy_path).
	Etcd *EtcdConfig
	// OIDC is the oidc_discovery block: nil means no discovery endpoint,
	// and JWT-SVIDs without iss.
	OIDC *OIDCConfig
	// BundleEndpoint is the bundle_endpoint block: nil means the trust
	// bundle is not served to federated trust domains.
	BundleEndpoint *BundleEndpointConfig
	// Federations are the federation blocks, one per trust domain whose
	// bundle the signer fetches, in file order.
	Federations []FederationConfig
}

// Values of key_storage.
const (
	KeyStorageTPM    = "tpm"
	KeyStorageMemory = "memory"
)

var signerConfigSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "trust_domain", Required: true},
		{Name: "listen_address"},
		{Name: "policy_path"}, // required without an etcd block
		{Name: "bundle_path", Required: true},
		{Name: "state_dir"},
		{Name: "admin_socket_path"},
		{Name: "ca_ttl"},
		{Name: "ca_publish_lead"},
		{Name: "x509_max_ttl"},
		{Name: "jwt_max_ttl"},
		{Name: "agent_ttl"},
		{Name: "log_level"},
		{Name: "log_format"},
		{Name: "metrics_address"},
		{Name: "key_storage"},
		{Name: "replica_name"},
	},
	Blocks: []hcl.BlockHeaderSchema{{Type: "limits"}, {Type: "tpm"}, {Type: "etcd"}, {Type: "oidc_discovery"},
		{Type: "bundle_endpoint"}, {Type: "federation", LabelNames: []string{"trust_domain"}}},
}

// LoadConfig reads and validates the signer config file at path. Problems
// in the file come back as hclconf.Errors; an unreadable file as the
// wrapped os error.
func LoadConfig(path string) (*Config, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read signer config: %w", err)
	}
	return ParseConfig(src, path)
}

// ParseConfig validates src as the signer config file filename, reporting
// every problem found as hclconf.Errors.
func ParseConfig(src []byte, filename string) (*Config, error) {
	body, diags := hclconf.Parse(src, filename)
	if diags.HasErrors() {
		return nil, hclconf.FromDiagnostics(diags).Err()
	}
	content, diags := body.Content(signerConfigSchema)
	dir := hclconf.BaseDir(filename)
	cfg := &Config{
		ListenAddress:   DefaultListenAddress,
		StateDir:        DefaultStateDir,
		AdminSocketPath: DefaultAdminSocketPath,
		CATTL:           DefaultCATTL,
		X509MaxTTL:      DefaultX509MaxTTL,
		JWTMaxTTL:       DefaultJWTMaxTTL,
		AgentTTL:        DefaultAgentTTL,
		LogLevel:        "info",
		LogFormat:       "text",
		Limits:          DefaultLimits(),
	}
	// set runs decode on the attribute name when it is present, keeping the
	// default otherwise; every diagnostic is kept.
	set := func(name string, decode func(*hcl.Attribute) hcl.Diagnostics) {
		if attr, ok := content.Attributes[name]; ok {
			diags = append(diags, decode(attr)...)
		}
	}
	set("trust_domain", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.TrustDomain, d = hclconf.TrustDomain(a)
		return d
	})
	set("listen_address", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.ListenAddress, d = hclconf.HostPort(a, true)
		return d
	})
	set("policy_path", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.PolicyPath, d = hclconf.Path(a, dir)
		return d
	})
	set("bundle_path", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.BundlePath, d = hclconf.Path(a, dir)
		return d
	})
	set("state_dir", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.StateDir, d = hclconf.Path(a, dir)
		return d
	})
	set("admin_socket_path", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.AdminSocketPath, d = hclconf.Path(a, dir)
		return d
	})
	set("ca_ttl", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.CATTL, d = hclconf.Duration(a, minCATTL)
		return d
	})
	set("ca_publish_lead", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.CAPublishLead, d = hclconf.Duration(a, minPublishLead)
		return d
	})
	set("x509_max_ttl", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.X509MaxTTL, d = hclconf.Duration(a, minX509MaxTTL)
		return d
	})
	set("jwt_max_ttl", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.JWTMaxTTL, d = hclconf.Duration(a, minJWTMaxTTL)
		return d
	})
	set("agent_ttl", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.AgentTTL, d = hclconf.Duration(a, minAgentSVIDTTL)
		return d
	})
	set("log_level", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.LogLevel, d = hclconf.LogLevel(a)
		return d
	})
	set("log_format", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.LogFormat, d = hclconf.LogFormat(a)
		return d
	})
	set("metrics_address", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.MetricsAddress, d = hclconf.LoopbackAddress(a)
		return d
	})
	hasTPM, d := tpmconf.Decode(content.Blocks.OfType("tpm"), body, dir, tpmconf.Options{}, &cfg.TPM)
	diags = append(diags, d...)
	cfg.KeyStorage = KeyStorageMemory
	if hasTPM {
		cfg.KeyStorage = KeyStorageTPM
	}
	set("key_storage", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.KeyStorage, d = hclconf.OneOf(a, KeyStorageTPM, KeyStorageMemory)
		if cfg.KeyStorage == KeyStorageTPM && !hasTPM {
			d = append(d, hclconf.Errorf(a.Expr.Range(), `key_storage: "tpm" needs a tpm block: tpm { device = "/dev/tpmrm0" } or tpm { socket = "/path/to/swtpm.sock" }`))
		}
		return d
	})
	diags = append(diags, decodeEtcd(content.Blocks.OfType("etcd"), dir, cfg)...)
	diags = append(diags, decodeReplicaName(content.Attributes, cfg)...)
	diags = append(diags, decodeOIDC(content.Blocks.OfType("oidc_discovery"), dir, cfg)...)
	diags = append(diags, decodeBundleEndpoint(content.Blocks.OfType("bundle_endpoint"), dir, cfg)...)
	diags = append(diags, decodeFederations(content.Blocks.OfType("federation"), dir, cfg)...)
	if _, ok := content.Attributes["policy_path"]; !ok && cfg.Etcd == nil {
		diags = append(diags, hclconf.Errorf(body.MissingItemRange(), `Missing required argument: The argument "policy_path" is required, but no definition was found (or add an etcd block, whose replicas share the policy).`))
	}
	diags = append(diags, fitToCA(cfg, content.Attributes)...)
	diags = append(diags, decodeLimits(content.Blocks.OfType("limits"), &cfg.Limits)...)
	if err := hclconf.FromDiagnostics(diags).Err(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// fitToCA checks the lifetimes that depend on ca_ttl, and derives those the
// file left out. A CA signs until half its lifetime (then its successor
// takes over), so an SVID of at most ca_ttl/2 never outlives its CA; and
// the successor is published ca_publish_lead before it takes over, which
// the CA's signing span (ca_ttl/2 minus that lead) can only honour when
// the lead is at most ca_ttl/4. A JWT signing key hands over with its CA
// and stays published at most until that CA's end, so JWT-SVIDs obey the
// same ca_ttl/2 bound. CATTL is 0 when ca_ttl was itself wrong,
// which already has its error.
func fitToCA(cfg *Config, attrs hcl.Attributes) hcl.Diagnostics {
	if cfg.CATTL <= 0 {
		return nil
	}
	var diags hcl.Diagnostics
	limit := func(name string, v *time.Duration, def, most time.Duration, what string) {
		attr, ok := attrs[name]
		switch {
		case !ok:
			*v = min(def, most)
		case *v > most:
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "%s: %s is longer than %s (%s)", name, *v, what, most))
		}
	}
	limit("ca_publish_lead", &cfg.CAPublishLead, DefaultCAPublishLead(cfg.CATTL), cfg.CATTL/4, "ca_ttl/4")
	limit("x509_max_ttl", &cfg.X509MaxTTL, DefaultX509MaxTTL, cfg.CATTL/2, "ca_ttl/2")
	limit("agent_ttl", &cfg.AgentTTL, DefaultAgentTTL, cfg.CATTL/2, "ca_ttl/2")
	limit("jwt_max_ttl", &cfg.JWTMaxTTL, DefaultJWTMaxTTL, cfg.CATTL/2, "ca_ttl/2")
	return diags
}

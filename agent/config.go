package agent

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/attestor/workload"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/internal/tpmconf"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/zclconf/go-cty/cty"
)

// Defaults of the agent config, as documented in the README.
const (
	DefaultSocketPath      = "/run/lanyard/workload.sock"
	DefaultAdminSocketPath = "/run/lanyard/admin/admin.sock"
	// SharedAdminSocketPath is where older configs (and the design's
	// example) put the admin socket, next to the Workload API's. The admin
	// commands look there when no socket is named and the default does not
	// exist.
	SharedAdminSocketPath = "/run/lanyard/admin.sock"
)

// Config is the agent's validated configuration file. Paths in it are
// absolute: relative ones in the file are resolved against its directory.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	// SignerAddresses are the signer replicas, host:port each (one
	// for a single signer). A name with several addresses counts as all
	// of them.
	SignerAddresses []string
	TrustBundlePath string // PEM bundle that authenticates the signer
	SocketPath      string // Workload API, open to every local user
	AdminSocketPath string // status and explain, root only
	TPM             node.TPMConfig
	// WorkloadAttestors names the workload attestors to run (see
	// workload.Attestors); empty means all of them.
	WorkloadAttestors []string
	LogLevel          string // trace, debug, info, warn or error
	LogFormat         string // text or json
	// MetricsAddress is the loopback host:port serving Prometheus
	// metrics on /metrics; empty (the default) means off.
	MetricsAddress string
	// HealthAddress is the loopback host:port serving /live and /ready;
	// empty (the default) means off. It may equal MetricsAddress.
	HealthAddress string
	// Limits bounds what Workload API callers can make the agent hold
	// (the optional limits block; see limits.go).
	Limits LimitsConfig
	// SDS names Envoy's SDS resources (the optional sds block; see
	// sdsconfig.go).
	SDS SDSConfig
}

var agentConfigSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "trust_domain", Required: true},
		{Name: "signer_address", Required: true},
		{Name: "trust_bundle_path", Required: true},
		{Name: "socket_path"},
		{Name: "admin_socket_path"},
		{Name: "workload_attestors"},
		{Name: "log_level"},
		{Name: "log_format"},
		{Name: "metrics_address"},
		{Name: "health_address"},
	},
	Blocks: []hcl.BlockHeaderSchema{{Type: "tpm"}, {Type: "limits"}, {Type: "sds"}},
}

// LoadConfig reads and validates the agent config file at path. Problems
// in the file come back as hclconf.Errors; an unreadable file as the
// wrapped os error.
func LoadConfig(path string) (*Config, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read agent config: %w", err)
	}
	return ParseConfig(src, path)
}

// LoadRunConfig is LoadConfig for `run`: it also reads the files the config
// names that must be right before anything starts (the trust bundle), so
// that a missing or broken one is a config error (exit 78, which systemd
// does not restart) and not a crash loop. Other commands (tpm info, status)
// need no bundle, so only run checks it.
func LoadRunConfig(path string) (*Config, error) {
	cfg, err := LoadConfig(path)
	if err != nil {
		return nil, err
	}
	if _, err := x509bundle.Load(cfg.TrustDomain, cfg.TrustBundlePath); err != nil {
		return nil, hclconf.Errors{{File: path, Line: attrLine(path, "trust_bundle_path"),
			Msg: fmt.Sprintf("trust_bundle_path: %v", err)}}.Err()
	}
	return cfg, nil
}

// attrLine returns the line of the top-level attribute name in the config
// file at path, or 0.
func attrLine(path, name string) int {
	src, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	body, _ := hclconf.Parse(src, path)
	if body == nil {
		return 0
	}
	content, _, _ := body.PartialContent(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: name}}})
	if a, ok := content.Attributes[name]; ok {
		return a.Range.Start.Line
	}
	return 0
}

// ParseConfig validates src as the agent config file filename, reporting
// every problem found as hclconf.Errors.
func ParseConfig(src []byte, filename string) (*Config, error) {
	body, diags := hclconf.Parse(src, filename)
	if diags.HasErrors() {
		return nil, hclconf.FromDiagnostics(diags).Err()
	}
	content, diags := body.Content(agentConfigSchema)
	dir := hclconf.BaseDir(filename)
	cfg := &Config{
		SocketPath:      DefaultSocketPath,
		AdminSocketPath: DefaultAdminSocketPath,
		LogLevel:        "info",
		LogFormat:       "text",
	}
	set := func(name string, decode func(*hcl.Attribute) hcl.Diagnostics) {
		if attr, ok := content.Attributes[name]; ok {
			diags = append(diags, decode(attr)...)
		}
	}
	set("trust_domain", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.TrustDomain, d = hclconf.TrustDomain(a)
		return d
	})
	set("signer_address", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.SignerAddresses, d = signerAddresses(a)
		return d
	})
	set("trust_bundle_path", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.TrustBundlePath, d = hclconf.Path(a, dir)
		return d
	})
	set("socket_path", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.SocketPath, d = hclconf.SocketPath(a, dir)
		return d
	})
	set("admin_socket_path", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.AdminSocketPath, d = hclconf.SocketPath(a, dir)
		return d
	})
	set("workload_attestors", func(a *hcl.Attribute) hcl.Diagnostics {
		items, d := hclconf.StringList(a)
		known := workload.Attestors()
		for _, it := range items {
			switch {
			case !slices.Contains(known, it.Value):
				d = append(d, hclconf.Errorf(it.Range, "workload_attestors: unknown attestor %q (want some of %s)", it.Value, strings.Join(known, ", ")))
			case slices.Contains(cfg.WorkloadAttestors, it.Value):
				d = append(d, hclconf.Errorf(it.Range, "workload_attestors: %q is listed twice", it.Value))
			default:
				cfg.WorkloadAttestors = append(cfg.WorkloadAttestors, it.Value)
			}
		}
		if len(items) == 0 && !d.HasErrors() {
			d = append(d, hclconf.Errorf(a.Expr.Range(), "workload_attestors: must name at least one attestor (leave it out to run all)"))
		}
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
	set("health_address", func(a *hcl.Attribute) (d hcl.Diagnostics) {
		cfg.HealthAddress, d = hclconf.LoopbackAddress(a)
		return d
	})
	if cfg.SocketPath != "" && cfg.SocketPath == cfg.AdminSocketPath {
		// Defaults differ, so at least one of the two was set.
		attr := content.Attributes["admin_socket_path"]
		if attr == nil {
			attr = content.Attributes["socket_path"]
		}
		diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "%s: the Workload API and the admin API need different sockets", attr.Name))
	}
	_, d := tpmconf.Decode(content.Blocks.OfType("tpm"), body, dir, tpmconf.Options{Required: true, Tuning: true}, &cfg.TPM)
	diags = append(diags, d...)
	diags = append(diags, decodeLimits(content.Blocks.OfType("limits"), &cfg.Limits)...)
	diags = append(diags, decodeSDS(content.Blocks.OfType("sds"), &cfg.SDS)...)
	if err := hclconf.FromDiagnostics(diags).Err(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// maxSignerAddresses bounds signer_address: a tier is a handful of
// replicas (a name may stand for more).
const maxSignerAddresses = 64

// signerAddresses decodes signer_address: one "host:port" string, as for
// a single signer, or a list of them, one per replica.
func signerAddresses(a *hcl.Attribute) ([]string, hcl.Diagnostics) {
	v, diags := a.Expr.Value(nil)
	if diags.HasErrors() {
		return nil, diags
	}
	if v.IsKnown() && !v.IsNull() && v.Type() == cty.String {
		s, d := hclconf.HostPort(a, false)
		if d.HasErrors() {
			return nil, d
		}
		return []string{s}, nil
	}
	if t := v.Type(); v.IsKnown() && !v.IsNull() && !t.IsTupleType() && !t.IsListType() {
		return nil, hcl.Diagnostics{hclconf.Errorf(a.Expr.Range(), "%s: expected \"host:port\" or a list of them, got %s", a.Name, t.FriendlyName())}
	}
	items, diags := hclconf.StringList(a)
	if diags.HasErrors() {
		return nil, diags
	}
	switch {
	case len(items) == 0:
		return nil, hcl.Diagnostics{hclconf.Errorf(a.Expr.Range(), "%s: must name at least one signer (\"host:port\")", a.Name)}
	case len(items) > maxSignerAddresses:
		return nil, hcl.Diagnostics{hclconf.Errorf(a.Expr.Range(), "%s: at most %d addresses", a.Name, maxSignerAddresses)}
	}
	var out, seen []string
	for i, it := range items {
		name := fmt.Sprintf("%s[%d]", a.Name, i)
		key, err := dialAddress(it.Value)
		switch {
		case err != nil:
			diags = append(diags, hclconf.Errorf(it.Range, "%s: %v", name, err))
		case slices.Contains(seen, key):
			diags = append(diags, hclconf.Errorf(it.Range, "%s: %q is listed twice", name, it.Value))
		default:
			seen = append(seen, key)
			out = append(out, it.Value)
		}
	}
	if diags.HasErrors() {
		return nil, diags
	}
	return out, nil
}

// dialAddress checks s as a host:port to dial (hclconf.HostPort's rules)
// and returns it in a form in which two spellings of one address are
// equal (case of the name, leading zeros of the port).
func dialAddress(s string) (string, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port", s)
	}
	if host == "" {
		return "", fmt.Errorf("%q has no host", s)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return "", fmt.Errorf("%q: port must be a number from 1 to 65535", s)
	}
	if ip := net.ParseIP(host); ip != nil {
		host = ip.String()
	}
	return net.JoinHostPort(strings.ToLower(host), strconv.FormatUint(n, 10)), nil
}

package agent

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/lanyard-dev/lanyard/attestor/node"
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
		{"agent.hcl", &Config{
			TrustDomain:     td,
			SignerAddresses: []string{"signer.example.org:8443"},
			TrustBundlePath: filepath.Join(dir, "bundle.pem"),
			SocketPath:      "/run/lanyard-test/workload.sock",
			AdminSocketPath: "/run/lanyard-test/admin.sock",
			TPM:             node.TPMConfig{Socket: "/run/swtpm/tpm.sock"},
			LogLevel:        "warn",
			LogFormat:       "json",
			Limits:          DefaultLimits(),
			SDS:             DefaultSDS(),
		}},
		{"agent-minimal.hcl", &Config{
			TrustDomain:     td,
			SignerAddresses: []string{"127.0.0.1:8443"},
			TrustBundlePath: "/etc/lanyard/bundle.pem",
			SocketPath:      "/run/lanyard/workload.sock",
			AdminSocketPath: DefaultAdminSocketPath,
			TPM:             node.TPMConfig{Device: "/dev/tpmrm0"},
			LogLevel:        "info",
			LogFormat:       "text",
			Limits:          DefaultLimits(),
			SDS:             DefaultSDS(),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
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

func TestParseConfigRelativePaths(t *testing.T) {
	src := "trust_domain = \"example.org\"\nsigner_address = \"s:1\"\ntrust_bundle_path = \"b.pem\"\nsocket_path = \"run/w.sock\"\ntpm { socket = \"tpm.sock\" }\n"
	cfg, err := ParseConfig([]byte(src), "/etc/lanyard/agent.hcl")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/etc/lanyard/b.pem", "/etc/lanyard/run/w.sock", "/etc/lanyard/tpm.sock"}
	if diff := cmp.Diff(want, []string{cfg.TrustBundlePath, cfg.SocketPath, cfg.TPM.Socket}); diff != "" {
		t.Errorf("resolved paths (-want +got):\n%s", diff)
	}
}

func TestParseConfigErrors(t *testing.T) {
	// Lines 1-3; a test adds a tpm block or not.
	const required = "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:8443\"\ntrust_bundle_path = \"b.pem\"\n"
	const tpm = "tpm { device = \"/dev/tpmrm0\" }\n"
	long := "/" + strings.Repeat("d", 107)
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"empty file", "", []string{
			`a.hcl:1: Missing required argument: The argument "trust_domain" is required, but no definition was found.`,
			`a.hcl:1: Missing required argument: The argument "signer_address" is required, but no definition was found.`,
			`a.hcl:1: Missing required argument: The argument "trust_bundle_path" is required, but no definition was found.`,
			`a.hcl:1: a tpm block is required: tpm { device = "/dev/tpmrm0" } or tpm { socket = "/path/to/swtpm.sock" }`,
		}},
		{"misspelt key", required + tpm + "socket_pth = \"/w.sock\"\n", []string{
			`a.hcl:5: Unsupported argument: An argument named "socket_pth" is not expected here. Did you mean "socket_path"?`,
		}},
		{"unknown block", required + tpm + "signer {}\n", []string{
			`a.hcl:5: Unsupported block type: Blocks of type "signer" are not expected here.`,
		}},
		{"syntax error", required + "tpm {\n", []string{
			`a.hcl:4: Unclosed configuration block: There is no closing brace for this block before the end of the file. This may be caused by incorrect brace nesting elsewhere in this file.`,
		}},
		{"bad trust domain", "trust_domain = \"exa mple\"\nsigner_address = \"a:1\"\ntrust_bundle_path = \"b\"\n" + tpm, []string{
			`a.hcl:1: trust_domain: "exa mple": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`,
		}},
		{"signer address without host", "trust_domain = \"example.org\"\nsigner_address = \":8443\"\ntrust_bundle_path = \"b\"\n" + tpm, []string{
			`a.hcl:2: signer_address: ":8443" has no host`,
		}},
		{"signer address without port", "trust_domain = \"example.org\"\nsigner_address = \"signer\"\ntrust_bundle_path = \"b\"\n" + tpm, []string{
			`a.hcl:2: signer_address: "signer" is not host:port`,
		}},
		{"socket path too long", required + tpm + "socket_path = \"" + long + "\"\n", []string{
			`a.hcl:5: socket_path: "` + long + `" is 108 bytes; a Unix socket path can be at most 107`,
		}},
		{"same socket twice", required + tpm + "admin_socket_path = \"/run/lanyard/workload.sock\"\n", []string{
			`a.hcl:5: admin_socket_path: the Workload API and the admin API need different sockets`,
		}},
		{"wrong type", required + tpm + "socket_path = [\"/a\"]\n", []string{
			`a.hcl:5: socket_path: expected a string, got tuple`,
		}},
		{"metrics on a public address", required + tpm + "metrics_address = \"0.0.0.0:9464\"\n", []string{
			`a.hcl:5: metrics_address: "0.0.0.0:9464": host must be a loopback address such as 127.0.0.1 or [::1] (the endpoint has no authentication)`,
		}},
		{"metrics on all interfaces", required + tpm + "metrics_address = \":9464\"\n", []string{
			`a.hcl:5: metrics_address: ":9464": host must be a loopback address such as 127.0.0.1 or [::1] (the endpoint has no authentication)`,
		}},
		{"health on a host name", required + tpm + "health_address = \"agent.example.org:8080\"\n", []string{
			`a.hcl:5: health_address: "agent.example.org:8080": host must be a loopback address such as 127.0.0.1 or [::1] (the endpoint has no authentication)`,
		}},
		{"health without port", required + tpm + "health_address = \"127.0.0.1\"\n", []string{
			`a.hcl:5: health_address: "127.0.0.1" is not host:port`,
		}},
		{"no tpm block", required, []string{
			`a.hcl:1: a tpm block is required: tpm { device = "/dev/tpmrm0" } or tpm { socket = "/path/to/swtpm.sock" }`,
		}},
		{"two tpm blocks", required + tpm + "tpm { socket = \"/s\" }\n", []string{
			`a.hcl:5: only one tpm block is allowed (first at line 4)`,
		}},
		{"tpm block with a label", required + "tpm \"x\" { device = \"/dev/tpmrm0\" }\n", []string{
			`a.hcl:4: Extraneous label for tpm: No labels are expected for tpm blocks.`,
		}},
		{"tpm with both", required + "tpm {\n  device = \"/dev/tpmrm0\"\n  socket = \"/s\"\n}\n", []string{
			`a.hcl:6: tpm: set device or socket, not both`,
		}},
		{"tpm with neither", required + "tpm {\n}\n", []string{
			`a.hcl:4: tpm: set device (e.g. /dev/tpmrm0) or socket`,
		}},
		{"tpm unknown key", required + "tpm {\n  path = \"/dev/tpm0\"\n}\n", []string{
			`a.hcl:4: tpm: set device (e.g. /dev/tpmrm0) or socket`,
			`a.hcl:5: Unsupported argument: An argument named "path" is not expected here.`,
		}},
		{"tpm empty device", required + "tpm { device = \"\" }\n", []string{
			`a.hcl:4: device: must not be empty`,
		}},
		{"unknown workload attestor", required + tpm + "workload_attestors = [\"unix\", \"docker\"]\n", []string{
			`a.hcl:5: workload_attestors: unknown attestor "docker" (want some of unix, systemd, cgroup, container, k8s)`,
		}},
		{"workload attestor twice", required + tpm + "workload_attestors = [\"unix\", \"unix\"]\n", []string{
			`a.hcl:5: workload_attestors: "unix" is listed twice`,
		}},
		{"no workload attestor", required + tpm + "workload_attestors = []\n", []string{
			`a.hcl:5: workload_attestors: must name at least one attestor (leave it out to run all)`,
		}},
		{"workload attestors not a list", required + tpm + "workload_attestors = \"unix\"\n", []string{
			`a.hcl:5: workload_attestors: expected a list of strings, got string`,
		}},
		{"key set twice", required + tpm + "log_level = \"info\"\nlog_level = \"debug\"\n", []string{
			`a.hcl:6: Attribute redefined: The argument "log_level" was already set at a.hcl:5,1-10. Each argument may be set only once.`,
		}},
		{"null value", required + tpm + "socket_path = null\n", []string{
			`a.hcl:5: socket_path: must not be null`,
		}},
		{"bool for a string", required + tpm + "log_level = true\n", []string{
			`a.hcl:5: log_level: expected a string, got bool`,
		}},
		{"variable reference", required + tpm + "socket_path = \"${path}\"\n", []string{
			`a.hcl:5: Variables not allowed: Variables may not be used here.`,
		}},
		{"tpm socket path too long", required + "tpm { socket = \"" + long + "\" }\n", []string{
			`a.hcl:4: socket: "` + long + `" is 108 bytes; a Unix socket path can be at most 107`,
		}},
		{"every problem at once", "trust_domain = 1\nsigner_address = \"a\"\nlog_level = \"loud\"\nlog_format = \"\"\n", []string{
			`a.hcl:1: Missing required argument: The argument "trust_bundle_path" is required, but no definition was found.`,
			`a.hcl:1: trust_domain: expected a string, got number`,
			`a.hcl:1: a tpm block is required: tpm { device = "/dev/tpmrm0" } or tpm { socket = "/path/to/swtpm.sock" }`,
			`a.hcl:2: signer_address: "a" is not host:port`,
			`a.hcl:3: log_level: "loud" is not one of trace, debug, info, warn, error`,
			`a.hcl:4: log_format: "" is not one of text, json`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(tt.src), "a.hcl")
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

func TestParseConfigTPMTuning(t *testing.T) {
	const base = "trust_domain = \"example.org\"\nsigner_address = \"s:1\"\ntrust_bundle_path = \"b.pem\"\n"
	tests := []struct {
		name, tpm          string
		wantProbe, wantMax time.Duration
		wantErr            string
	}{
		{name: "defaults", tpm: `tpm { socket = "/s" }`},
		{name: "both set", tpm: "tpm {\n  socket = \"/s\"\n  probe_interval = \"1s\"\n  reopen_max_interval = \"500ms\"\n}", wantProbe: time.Second, wantMax: 500 * time.Millisecond},
		{name: "probe too often", tpm: "tpm {\n  device = \"/dev/tpmrm0\"\n  probe_interval = \"10ms\"\n}", wantErr: `a.hcl:6: probe_interval: 10ms is below the minimum of 100ms`},
		{name: "reopen too rare", tpm: "tpm {\n  socket = \"/s\"\n  reopen_max_interval = \"1h\"\n}", wantErr: `a.hcl:6: reopen_max_interval: 1h0m0s is over the maximum of 10m0s`},
		{name: "not a duration", tpm: "tpm {\n  socket = \"/s\"\n  probe_interval = \"soon\"\n}", wantErr: `a.hcl:6: probe_interval: invalid duration "soon" (write it like "90s", "5m" or "1h")`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(base+tt.tpm+"\n"), "a.hcl")
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("ParseConfig error = %v, want %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.TPM.ProbeInterval != tt.wantProbe || cfg.TPM.ReopenMax != tt.wantMax {
				t.Errorf("probe_interval, reopen_max_interval = %v, %v; want %v, %v", cfg.TPM.ProbeInterval, cfg.TPM.ReopenMax, tt.wantProbe, tt.wantMax)
			}
		})
	}
}

func TestParseConfigLoopbackAddresses(t *testing.T) {
	const base = "trust_domain = \"example.org\"\nsigner_address = \"s:1\"\ntrust_bundle_path = \"b.pem\"\ntpm { socket = \"tpm.sock\" }\n"
	tests := []struct {
		name, src             string
		wantMetrics, wantHeal string
	}{
		{"off by default", base, "", ""},
		{"ipv4 loopback", base + "metrics_address = \"127.0.0.1:9464\"\n", "127.0.0.1:9464", ""},
		{"other 127/8 address", base + "health_address = \"127.0.0.2:8080\"\n", "", "127.0.0.2:8080"},
		{"ipv6 loopback", base + "metrics_address = \"[::1]:9464\"\n", "[::1]:9464", ""},
		{"localhost, shared", base + "metrics_address = \"localhost:9464\"\nhealth_address = \"localhost:9464\"\n", "localhost:9464", "localhost:9464"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(tt.src), "/etc/lanyard/agent.hcl")
			if err != nil {
				t.Fatal(err)
			}
			if cfg.MetricsAddress != tt.wantMetrics || cfg.HealthAddress != tt.wantHeal {
				t.Errorf("metrics_address, health_address = %q, %q; want %q, %q", cfg.MetricsAddress, cfg.HealthAddress, tt.wantMetrics, tt.wantHeal)
			}
		})
	}
}

// TestParseConfigSignerAddresses: signer_address is one "host:port", as
// for a single signer, or a list of them, one per replica; each problem
// is reported at its element's line, and nothing is kept.
func TestParseConfigSignerAddresses(t *testing.T) {
	const head = "trust_domain = \"example.org\"\ntrust_bundle_path = \"b.pem\"\ntpm { socket = \"tpm.sock\" }\n"
	tests := []struct {
		name    string
		value   string // signer_address's value, on line 4
		want    []string
		wantErr string
	}{
		{name: "one string", value: `"10.0.1.1:8443"`, want: []string{"10.0.1.1:8443"}},
		{name: "a list", value: `["10.0.1.1:8443", "signer-b.example.org:8443", "[fd00::3]:8443"]`,
			want: []string{"10.0.1.1:8443", "signer-b.example.org:8443", "[fd00::3]:8443"}},
		{name: "a list of one", value: `["signers.example.org:8443"]`, want: []string{"signers.example.org:8443"}},
		{name: "multi-line list", value: "[\n  \"10.0.1.1:8443\",\n  \"10.0.1.2:8443\",\n]", want: []string{"10.0.1.1:8443", "10.0.1.2:8443"}},
		{name: "empty list", value: `[]`, wantErr: `a.hcl:4: signer_address: must name at least one signer ("host:port")`},
		{name: "duplicate", value: "[\n  \"10.0.1.1:8443\",\n  \"10.0.1.1:8443\",\n]", wantErr: `a.hcl:6: signer_address[1]: "10.0.1.1:8443" is listed twice`},
		{name: "duplicate, spelt differently", value: `["Signer.example.org:8443", "signer.example.org:08443"]`,
			wantErr: `a.hcl:4: signer_address[1]: "signer.example.org:08443" is listed twice`},
		{name: "no port in a list", value: "[\n  \"10.0.1.1:8443\",\n  \"10.0.1.2\",\n]", wantErr: `a.hcl:6: signer_address[1]: "10.0.1.2" is not host:port`},
		{name: "no host in a list", value: `["10.0.1.1:8443", ":8443"]`, wantErr: `a.hcl:4: signer_address[1]: ":8443" has no host`},
		{name: "port 0 in a list", value: `["10.0.1.1:0"]`, wantErr: `a.hcl:4: signer_address[0]: "10.0.1.1:0": port must be a number from 1 to 65535`},
		{name: "every bad element", value: "[\n  \"a\",\n  \"b:99999\",\n]", wantErr: "a.hcl:5: signer_address[0]: \"a\" is not host:port\n" +
			`a.hcl:6: signer_address[1]: "b:99999": port must be a number from 1 to 65535`},
		{name: "not a string in a list", value: `["10.0.1.1:8443", 8443]`, wantErr: `a.hcl:4: signer_address[1]: expected a string, got number`},
		{name: "a number", value: `8443`, wantErr: `a.hcl:4: signer_address: expected "host:port" or a list of them, got number`},
		{name: "null", value: `null`, wantErr: `a.hcl:4: signer_address: must not be null`},
		{name: "too many", value: "[" + strings.Repeat(`"a:1", `, maxSignerAddresses+1) + "]", wantErr: `a.hcl:4: signer_address: at most 64 addresses`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(head+"signer_address = "+tt.value+"\n"), "a.hcl")
			if tt.wantErr != "" {
				if cfg != nil {
					t.Errorf("ParseConfig returned a config along with errors")
				}
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("ParseConfig error = %v, want %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, cfg.SignerAddresses); diff != "" {
				t.Errorf("SignerAddresses (-want +got):\n%s", diff)
			}
		})
	}
}

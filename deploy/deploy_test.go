// Package deploy holds the systemd units and example configs `make install`
// puts in place; its tests check that systemd accepts the units and that
// the examples pass the binaries' own validation.
package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/signer"
	"github.com/lanyard-dev/lanyard/signer/policy"
)

// TestUnitsVerify runs `systemd-analyze verify` on both units, with
// ExecStart pointed at freshly built binaries (verify checks that the
// command exists). Any output is a failure: systemd reports an unknown
// or misspelt directive as a warning and still exits 0.
func TestUnitsVerify(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found (package systemd): cannot verify the units")
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-tags", "grpcnotrace", "-o", bin+"/", "../cmd/lanyard-agent", "../cmd/lanyard-signer")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build binaries: %v\n%s", err, out)
	}
	for _, unit := range []string{"lanyard-agent.service", "lanyard-signer.service"} {
		t.Run(unit, func(t *testing.T) {
			src, err := os.ReadFile(unit)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(src), "ExecStart=/usr/local/bin/") {
				t.Fatalf("%s: ExecStart is not under /usr/local/bin, where make install rewrites it", unit)
			}
			dir := t.TempDir()
			path := filepath.Join(dir, unit)
			if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(src), "/usr/local/bin/", bin+"/")), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(analyze, "verify", path).CombinedOutput()
			if err != nil || len(out) > 0 {
				t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
			}
		})
	}
}

// TestUnitsDirectives pins the directives the README promises, so an edit
// that drops one fails here and not on a host.
func TestUnitsDirectives(t *testing.T) {
	common := []string{"Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=78", "LimitCORE=0", "MemorySwapMax=0",
		"NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "MemoryDenyWriteExecute=yes",
		"ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectControlGroups=yes",
		"RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "LockPersonality=yes", "RestrictRealtime=yes",
		"SystemCallArchitectures=native"}
	tests := []struct {
		unit    string
		want    []string
		notWant []string
	}{
		{"lanyard-agent.service", append(common, "RuntimeDirectory=lanyard", "RuntimeDirectoryMode=0755",
			"ProtectHome=read-only", "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
			"DevicePolicy=closed", "DeviceAllow=/dev/tpmrm0 rw"),
			// The agent must see every caller's /proc entry.
			[]string{"ProtectProc=", "ProcSubset=", "PrivateUsers=", "DynamicUser="}},
		{"lanyard-signer.service", append(common, "StateDirectory=lanyard-signer", "DynamicUser=yes",
			"ProtectHome=yes", "CapabilityBoundingSet=\n", "DevicePolicy=closed", "DeviceAllow=/dev/tpmrm0 rw", "SupplementaryGroups=tss"),
			// PrivateDevices=yes would hide the TPM that unseals the keys.
			[]string{"PrivateDevices="}},
	}
	for _, tt := range tests {
		t.Run(tt.unit, func(t *testing.T) {
			src, err := os.ReadFile(tt.unit)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(string(src), "\n"+w) {
					t.Errorf("%s lacks %q", tt.unit, w)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(string(src), "\n"+w) {
					t.Errorf("%s has %q", tt.unit, w)
				}
			}
		})
	}
}

// TestExampleConfigsLoad loads the example configs as the binaries would,
// from their installed layout (/etc/lanyard: relative paths resolve next
// to each file).
func TestExampleConfigsLoad(t *testing.T) {
	a, err := agent.LoadConfig("agent.hcl")
	if err != nil {
		t.Fatalf("agent.hcl: %v", err)
	}
	if a.SocketPath != "/run/lanyard/workload.sock" || a.TPM.Device != "/dev/tpmrm0" {
		t.Errorf("agent.hcl: socket %q, TPM device %q: not what the unit's RuntimeDirectory and DeviceAllow expect", a.SocketPath, a.TPM.Device)
	}
	s, err := signer.LoadConfig("signer.hcl")
	if err != nil {
		t.Fatalf("signer.hcl: %v", err)
	}
	if s.KeyStorage != signer.KeyStorageTPM || s.TPM.Device != "/dev/tpmrm0" {
		t.Errorf("signer.hcl: key_storage %q, TPM device %q: the example keeps its keys in the TPM the unit's DeviceAllow opens", s.KeyStorage, s.TPM.Device)
	}
	// The unit makes only StateDirectory writable.
	for _, p := range []string{s.StateDir, filepath.Dir(s.BundlePath)} {
		if p != "/var/lib/lanyard-signer" {
			t.Errorf("signer.hcl writes to %s, outside StateDirectory=lanyard-signer", p)
		}
	}
	abs, err := filepath.Abs("policy.hcl")
	if err != nil {
		t.Fatal(err)
	}
	if s.PolicyPath != abs {
		t.Errorf("signer.hcl policy_path = %s, want policy.hcl next to it", s.PolicyPath)
	}
	p, err := policy.Load(s.PolicyPath, s.TrustDomain)
	if err != nil {
		t.Fatalf("policy.hcl: %v", err)
	}
	if len(p.Nodes) == 0 || len(p.Workloads) == 0 {
		t.Errorf("policy.hcl: %d nodes, %d workloads: an example should show both", len(p.Nodes), len(p.Workloads))
	}
	if a.TrustDomain != s.TrustDomain {
		t.Errorf("agent trust domain %s, signer %s", a.TrustDomain, s.TrustDomain)
	}
	r, err := signer.LoadConfig("signer-replica.hcl")
	if err != nil {
		t.Fatalf("signer-replica.hcl: %v", err)
	}
	if r.Etcd == nil || len(r.Etcd.Endpoints) != 3 || r.Etcd.CertFile == "" || r.PolicyPath != "" || r.ReplicaName != "signer-1" || r.TrustDomain != s.TrustDomain {
		t.Errorf("signer-replica.hcl: %+v: want a TLS etcd block of three members, a replica name and no policy_path", r)
	}
	for _, p := range []string{r.StateDir, filepath.Dir(r.BundlePath)} {
		if p != "/var/lib/lanyard-signer" {
			t.Errorf("signer-replica.hcl writes to %s, outside StateDirectory=lanyard-signer", p)
		}
	}
}

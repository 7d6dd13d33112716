package main

import (
	"testing"

	"github.com/lanyard-dev/lanyard/agent"
)

func TestStatusLine(t *testing.T) {
	const addr = "10.0.0.1:8443"
	attested := agent.AgentReport{SPIFFEID: "spiffe://example.org/lanyard/agent/tpm/ab"}
	tests := []struct {
		name    string
		r       agent.Report
		serving bool
		want    string
	}{
		{"first attempt", agent.Report{}, false, "attesting to the signer at " + addr},
		{"signer down at start", agent.Report{Signer: agent.SignerReport{ConsecutiveFailures: 3}}, false,
			"not attested: signer " + addr + " unreachable or refusing (3 failures), retrying"},
		{"attested, not serving yet", agent.Report{Agent: attested}, false, "attested; syncing entries and signing first SVIDs"},
		{"healthy", agent.Report{Agent: attested, Health: agent.Healthy, Entries: make([]agent.EntryReport, 1)}, true,
			"healthy: serving 1 entry"},
		{"degraded says why", agent.Report{Agent: attested, Health: agent.Degraded, Entries: make([]agent.EntryReport, 2),
			Reasons: []string{"signer unreachable (sync stream down)", "2 renewal rounds failed in a row"}}, true,
			"degraded: serving 2 entries; signer unreachable (sync stream down); 2 renewal rounds failed in a row"},
		{"TPM lost while serving", agent.Report{Agent: attested, Health: agent.Degraded, Entries: make([]agent.EntryReport, 1),
			Reasons: []string{"TPM unreachable for 3s (2 reopen attempts failed): dial: refused"}, TPM: agent.TPMReport{Error: "dial: refused"}}, true,
			"degraded: serving 1 entry; TPM unreachable for 3s (2 reopen attempts failed): dial: refused"},
		{"several replicas: the one in use", agent.Report{Agent: attested, Health: agent.Healthy, Entries: make([]agent.EntryReport, 1),
			Signer: agent.SignerReport{Address: "10.0.0.2:8443", Candidates: []string{addr, "10.0.0.2:8443"}}}, true,
			"healthy: serving 1 entry via signer 10.0.0.2:8443"},
		{"several replicas, attesting: the one tried", agent.Report{Signer: agent.SignerReport{Address: "10.0.0.2:8443", ConsecutiveFailures: 1}}, false,
			"not attested: signer 10.0.0.2:8443 unreachable or refusing (1 failure), retrying"},
		{"TPM lost before serving", agent.Report{Signer: agent.SignerReport{ConsecutiveFailures: 2}, TPM: agent.TPMReport{Error: "dial: refused"}}, false,
			"not serving yet: TPM unreachable, reopening it: dial: refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := statusLine(tt.r, tt.serving, addr); got != tt.want {
				t.Errorf("statusLine = %q, want %q", got, tt.want)
			}
		})
	}
}

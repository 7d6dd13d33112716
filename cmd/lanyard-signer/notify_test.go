package main

import (
	"testing"

	"github.com/lanyard-dev/lanyard/signer"
)

func TestStatusLine(t *testing.T) {
	tests := []struct {
		name string
		st   signer.Stats
		want string
	}{
		{"counts", signer.Stats{Agents: 2, Nodes: 1, Workloads: 3, BundleSequence: 4},
			"listening on 127.0.0.1:8443: 2 agents, policy with 1 nodes and 3 workloads, bundle sequence 4"},
		{"refused edit first", signer.Stats{Nodes: 1, BundleSequence: 1, PolicyReloadFailures: 1, LastReloadError: "/etc/lanyard/policy.hcl:7: nodes: no node block named \"x\""},
			"policy edit refused, last good policy in force: /etc/lanyard/policy.hcl:7: nodes: no node block named \"x\"; listening on 127.0.0.1:8443: 0 agents, policy with 1 nodes and 0 workloads, bundle sequence 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := statusLine(tt.st, "127.0.0.1:8443"); got != tt.want {
				t.Errorf("statusLine = %q, want %q", got, tt.want)
			}
		})
	}
}

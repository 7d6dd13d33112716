package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
)

// TestPrintReport: the human status answers "healthy, and if not, why" in
// its first line, and every fact line starts its value in one column.
func TestPrintReport(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) *time.Time { x := now.Add(d); return &x }
	r := agent.Report{
		Version: "v1.2.3", Health: agent.Degraded, Reasons: []string{"signer unreachable (sync stream down)"},
		UptimeSeconds: 3720,
		Agent: agent.AgentReport{SPIFFEID: "spiffe://example.org/lanyard/agent/tpm/9f2c", NotAfter: at(time.Hour), RenewAt: at(30 * time.Minute),
			EKSHA256: "9f2c", TPMManufacturer: "IBM"},
		Signer:      agent.SignerReport{Address: "127.0.0.1:8443", LastSync: at(-4 * time.Minute), Since: at(-12 * time.Second), ConsecutiveFailures: 3},
		Bundle:      []agent.CAReport{{NotAfter: now.Add(24 * time.Hour)}},
		Entries:     []agent.EntryReport{{ID: "web", SPIFFEID: "spiffe://example.org/web", Serial: "5be1", NotAfter: at(50 * time.Minute), RenewAt: at(20 * time.Minute)}, {ID: "db", SPIFFEID: "spiffe://example.org/db"}},
		JWT:         agent.JWTReport{KeyIDs: []string{"k1", "k2"}, TokensCached: 1, Revocations: 2},
		OpenStreams: map[string]int64{"FetchX509SVID": 2, "FetchX509Bundles": 0},
	}
	var out bytes.Buffer
	printReport(&out, r, now)
	lines := strings.Split(out.String(), "\n")

	want := []string{
		"Health:   degraded: signer unreachable (sync stream down)",
		"Agent:    spiffe://example.org/lanyard/agent/tpm/9f2c, expires in 1h0m0s, renews in 30m0s",
		"TPM:      IBM, EK SHA-256 9f2c",
		"Signer:   127.0.0.1:8443, DISCONNECTED since 12s ago, last sync message 4m0s ago, 3 consecutive failures",
		"Bundle:   1 CA: expires in 24h0m0s",
		"JWT:      2 signing keys, 1 token cached, 2 revocations in force",
		"Streams:  2 open (FetchX509SVID 2)",
		"Uptime:   1h2m0s, version v1.2.3",
		"",
	}
	for i, w := range want {
		if i >= len(lines) || lines[i] != w {
			t.Errorf("line %d = %q, want %q\nwhole output:\n%s", i, lines[min(i, len(lines)-1)], w, out.String())
		}
	}
	if !strings.Contains(out.String(), "db     spiffe://example.org/db   NO VALID SVID") {
		t.Errorf("an entry without an SVID is not flagged:\n%s", out.String())
	}
}

// TestPrintReportTPMUnreachable: a lost TPM shows on the TPM line, with
// how long, how many reopen attempts failed and the error.
func TestPrintReportTPMUnreachable(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	lost := now.Add(-7 * time.Second)
	r := agent.Report{
		Health: agent.Degraded,
		Agent:  agent.AgentReport{SPIFFEID: "spiffe://example.org/lanyard/agent/tpm/9f2c", EKSHA256: "9f2c", TPMManufacturer: "IBM"},
		TPM:    agent.TPMReport{Error: "dial TPM socket /run/swtpm/tpm.sock: connection refused", UnreachableSince: &lost, ReopenFailures: 3},
	}
	var out bytes.Buffer
	printReport(&out, r, now)
	want := "TPM:      IBM, EK SHA-256 9f2c, UNREACHABLE for 7s, 3 reopen attempts failed: dial TPM socket /run/swtpm/tpm.sock: connection refused\n"
	if !strings.Contains(out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, out.String())
	}
}

// TestStatusRevoked: an agent the signer revoked says so on the first line
// of `status`, and status exits 2.
func TestStatusRevoked(t *testing.T) {
	r := agent.Report{Health: agent.Unhealthy, Reasons: []string{"revoked by the signer: host stolen", "signer unreachable (sync stream down)"}}
	var out bytes.Buffer
	printReport(&out, r, time.Now())
	first, _, _ := strings.Cut(out.String(), "\n")
	if want := "Health:   unhealthy: revoked by the signer: host stolen; signer unreachable (sync stream down)"; first != want {
		t.Errorf("first line = %q, want %q", first, want)
	}
	if got := healthExit(r.Health); got != 2 {
		t.Errorf("exit code = %d, want 2", got)
	}
}

// TestPrintReportReplicas: with several signer replicas, status names the
// one in use, the others, and those it could not reach recently, in the
// same column as every other line.
func TestPrintReportReplicas(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) *time.Time { x := now.Add(d); return &x }
	r := agent.Report{
		Health: agent.Healthy,
		Signer: agent.SignerReport{Address: "10.0.1.2:8443", Connected: true, Since: at(-3 * time.Second), LastSync: at(-3 * time.Second),
			Addresses:  []string{"10.0.1.1:8443", "10.0.1.2:8443", "10.0.1.3:8443"},
			Candidates: []string{"10.0.1.1:8443", "10.0.1.2:8443", "10.0.1.3:8443"},
			Unreachable: []agent.UnreachableReport{
				{Address: "10.0.1.1:8443", Error: "rpc error: code = Unavailable desc = connection refused", At: now.Add(-4 * time.Second)},
			}},
	}
	var out bytes.Buffer
	printReport(&out, r, now)
	want := "Signer:   10.0.1.2:8443, connected since 3s ago, last sync message 3s ago, 0 consecutive failures\n" +
		"Tier:     3 replicas: 10.0.1.1:8443, 10.0.1.2:8443, 10.0.1.3:8443\n" +
		"          unreachable 10.0.1.1:8443, 4s ago: rpc error: code = Unavailable desc = connection refused\n" +
		"Bundle:   0 CAs: \n"
	if !strings.Contains(out.String(), want) {
		t.Errorf("output lacks\n%s\nwhole output:\n%s", want, out.String())
	}
	r.Signer.Candidates = r.Signer.Candidates[:1]
	out.Reset()
	printReport(&out, r, now)
	if strings.Contains(out.String(), "Tier:") {
		t.Errorf("a single signer shows a Tier line:\n%s", out.String())
	}
}

// TestPrintReportFederated: each federated bundle held gets a line, with
// its sequence, its CAs' expiry and its JWT keys; without federation
// there is no such line.
func TestPrintReportFederated(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	r := agent.Report{
		Health: agent.Healthy,
		Federated: []agent.FederatedReport{
			{TrustDomain: "other.org", Sequence: 7, CAs: []agent.CAReport{{NotAfter: now.Add(time.Hour)}, {NotAfter: now.Add(2 * time.Hour)}}, JWTKeyIDs: []string{"k1"}},
			{TrustDomain: "third.org", Sequence: 1, CAs: []agent.CAReport{}, JWTKeyIDs: []string{"a", "b"}},
		},
	}
	var out bytes.Buffer
	printReport(&out, r, now)
	for _, want := range []string{
		"Federated:  other.org sequence 7, 2 CAs (expires in 1h0m0s; expires in 2h0m0s), 1 JWT key\n",
		"            third.org sequence 1, 0 CAs, 2 JWT keys\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	r.Federated = nil
	out.Reset()
	printReport(&out, r, now)
	if strings.Contains(out.String(), "Federated") {
		t.Errorf("a report without federated bundles prints a Federated line:\n%s", out.String())
	}
}

//go:build cgo

package agent

import (
	"encoding/base64"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestSignerAuditAndMetrics runs a real attestation, sync and signing
// round against a signer logging JSON, then checks the signer's audit
// lines (README "Audit log") and metrics, and that no line holds a key or
// a CSR.
func TestSignerAuditAndMetrics(t *testing.T) {
	tpm, ek := openSimTPM(t)
	var logs jsonLog
	sig := startSignerLog(t, simPolicy(ek, fakeEK("other")), logs.logger())
	u := newSimUpstream(t, sig, tpm)
	if _, err := u.attestOnce(callCtx(t)); err != nil {
		t.Fatalf("attest: %v", err)
	}
	e := &simEnv{sig: sig, ek: ek, u: u}
	e.firstSync(t) // holds one Sync stream open until the test ends
	m := sig.s.Metrics()

	good, _ := newCSR(t, nil)
	resp, err := e.client(t).SignX509SVIDs(callCtx(t), &signerpb.SignX509SVIDsRequest{Csrs: []*signerpb.CSR{
		{EntryId: "mine", Csr: good},
		{EntryId: "theirs", Csr: good},
		{EntryId: "mine", Csr: []byte("not a CSR")},
	}})
	if err != nil {
		t.Fatalf("SignX509SVIDs: %v", err)
	}
	if len(resp.GetSvids()) != 3 || len(resp.GetSvids()[0].GetChain()) == 0 {
		t.Fatalf("SignX509SVIDs: %v, want the first signed", resp)
	}
	m.PolicyReload(true)
	m.PolicyReload(false)
	m.PolicyReload(false)

	agentID := "spiffe://example.org/lanyard/agent/tpm/" + ek
	logs.checkLine(t, "agent attested", map[string]any{
		"ek_sha256": ek, "spiffe_id": agentID, "nodes": "[lab]", "serial": nil, "not_after": nil, "duration_ms": nil,
	})
	logs.checkLine(t, "x509-svid signed", map[string]any{
		"agent": agentID, "entry": "mine", "spiffe_id": "spiffe://example.org/mine", "serial": nil, "not_after": nil,
	})
	refused := logs.lines(t, "x509-svid refused")
	if len(refused) != 2 || refused[0]["entry"] != "theirs" || refused[0]["agent"] != agentID || refused[0]["spiffe_id"] != "" ||
		refused[1]["spiffe_id"] != "spiffe://example.org/mine" ||
		!strings.Contains(refused[0]["reason"].(string), "not authorized") || !strings.Contains(refused[1]["reason"].(string), "parse CSR") {
		t.Errorf("x509-svid refused lines = %v, want theirs (not authorized) and mine (parse CSR)", refused)
	}
	logs.checkNoSecrets(t, base64.StdEncoding.EncodeToString(good))

	const want = `
# HELP lanyard_signer_attestations_total Agent attestations by result: ok, refused (policy or TPM proof), malformed, error.
# TYPE lanyard_signer_attestations_total counter
lanyard_signer_attestations_total{result="ok"} 1
# HELP lanyard_signer_policy_reloads_total Policy file reloads by result: ok, or error (the last good policy stays in force).
# TYPE lanyard_signer_policy_reloads_total counter
lanyard_signer_policy_reloads_total{result="error"} 2
lanyard_signer_policy_reloads_total{result="ok"} 1
# HELP lanyard_signer_svid_refusals_total CSRs refused, by reason.
# TYPE lanyard_signer_svid_refusals_total counter
lanyard_signer_svid_refusals_total{reason="bad_csr"} 1
lanyard_signer_svid_refusals_total{reason="not_authorized"} 1
# HELP lanyard_signer_svids_signed_total Workload X.509-SVIDs signed.
# TYPE lanyard_signer_svids_signed_total counter
lanyard_signer_svids_signed_total 1
# HELP lanyard_signer_sync_streams Open Sync streams: agents connected now.
# TYPE lanyard_signer_sync_streams gauge
lanyard_signer_sync_streams 1
# HELP lanyard_signer_attested_agents Agents attested with this signer and still in policy (since its start).
# TYPE lanyard_signer_attested_agents gauge
lanyard_signer_attested_agents 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want),
		"lanyard_signer_attestations_total", "lanyard_signer_policy_reloads_total", "lanyard_signer_svid_refusals_total",
		"lanyard_signer_svids_signed_total", "lanyard_signer_sync_streams", "lanyard_signer_attested_agents"); err != nil {
		t.Error(err)
	}
	if n, err := testutil.GatherAndCount(m.Registry(), "lanyard_signer_attestation_duration_seconds", "lanyard_signer_ca_not_after_seconds"); err != nil || n != 2 {
		t.Errorf("attestation_duration_seconds and ca_not_after_seconds: %d series (%v), want 2", n, err)
	}
}

// TestSignerAuditRefusedAttestation checks the audit line and count of an
// attestation the policy refuses: it names the TPM and the reason.
func TestSignerAuditRefusedAttestation(t *testing.T) {
	tpm, ek := openSimTPM(t)
	var logs jsonLog
	sig := startSignerLog(t, simPolicy(fakeEK("someone else"), fakeEK("other")), logs.logger())
	u := newSimUpstream(t, sig, tpm)
	if _, err := u.attestOnce(callCtx(t)); err == nil {
		t.Fatal("attest succeeded with an unpinned EK")
	}
	logs.checkLine(t, "attestation refused", map[string]any{"ek_sha256": ek, "reason": nil, "duration_ms": nil, "peer": nil})
	logs.checkNoSecrets(t)
	const want = `
# HELP lanyard_signer_attestations_total Agent attestations by result: ok, refused (policy or TPM proof), malformed, error.
# TYPE lanyard_signer_attestations_total counter
lanyard_signer_attestations_total{result="ok"} 0
lanyard_signer_attestations_total{result="refused"} 1
`
	if err := testutil.GatherAndCompare(sig.s.Metrics().Registry(), strings.NewReader(want), "lanyard_signer_attestations_total"); err != nil {
		t.Error(err)
	}
}

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// signerCmd runs a lanyard-signer subcommand as root.
func signerCmd(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return binCmd(t, "lanyard-signer", nil, args...)
}

// TestNodeRevoke: revoking a node while its agent streams closes its Sync
// stream at once and refuses it; the agent's status says why and exits 2;
// after unrevoke the agent attests again by itself and serves workloads.
// It logs (does not assert) how long revoke to Sync closed took.
func TestNodeRevoke(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ekCAPolicy(tpm, fmt.Sprint(os.Getuid())))
	signer := e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")
	if out, err := e.fetchAs(t, uint32(os.Getuid()), uint32(os.Getgid())); err != nil {
		t.Fatalf("fetch before revoke: %v\n%s", err, out)
	}

	out, code := signerCmd(t, "node", "list", "--json", "--config", e.signerCfg)
	var nodes []struct {
		EKSHA256     string `json:"ek_sha256"`
		AgentID      string `json:"agent_id"`
		Connected    bool   `json:"connected"`
		AgentVersion string `json:"agent_version"`
		Nodes        []string
	}
	if err := json.Unmarshal([]byte(out), &nodes); code != 0 || err != nil || len(nodes) != 1 {
		t.Fatalf("node list: exit %d, %v:\n%s", code, err, out)
	}
	n := nodes[0]
	if !n.Connected || n.AgentVersion == "" || len(n.Nodes) != 1 || n.Nodes[0] != "lab" {
		t.Errorf("node list entry: %+v", n)
	}

	start := time.Now()
	out, code = signerCmd(t, "node", "revoke", n.AgentID, "--reason", "host stolen", "--admin-socket", e.signerAdmin)
	if code != 0 {
		t.Fatalf("node revoke: exit %d\n%s", code, out)
	}
	for !strings.Contains(signer.out.String(), "sync stream closed: node revoked") {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("Sync stream not closed 10s after revoke:\n%s", signer.out)
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("MEASURED node revoke (command start) to Sync closed: %v", time.Since(start))
	agent.waitLog(t, 10*time.Second, "node revoked: host stolen")
	waitFor(t, 10*time.Second, "agent status says revoked", func() bool {
		out, code := agentCmd(t, nil, "status", "--config", e.agentCfg)
		return code == 2 && strings.HasPrefix(out, "Health:") &&
			strings.Contains(strings.Split(out, "\n")[0], "revoked by the signer: host stolen")
	})
	// Its agent SVID is still valid: the retried Sync is refused by it.
	signer.waitLog(t, 10*time.Second, `call refused: node revoked`)
	out, code = signerCmd(t, "status", "--config", e.signerCfg)
	if code != 0 || !strings.Contains(out, "Revoked:  1") {
		t.Errorf("signer status: exit %d:\n%s", code, out)
	}

	out, code = signerCmd(t, "node", "unrevoke", n.EKSHA256, "--admin-socket", e.signerAdmin)
	if code != 0 {
		t.Fatalf("node unrevoke: exit %d\n%s", code, out)
	}
	waitFor(t, 30*time.Second, "agent healthy again", func() bool {
		_, code := agentCmd(t, nil, "status", "--config", e.agentCfg)
		return code == 0
	})
	if out, err := e.fetchAs(t, uint32(os.Getuid()), uint32(os.Getgid())); err != nil {
		t.Fatalf("fetch after unrevoke: %v\n%s", err, out)
	}
	if c := strings.Count(agent.out.String(), "agent attested"); c < 2 {
		t.Errorf("agent attested %d times, want a second attestation after unrevoke", c)
	}
}

package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// TestTierReplicaKill9Failover: the replica an agent is synced to is
// killed with -9. The agent is synced to another replica within
// failoverBound, and a workload streaming 20 s SVIDs sees no error and
// never holds an invalid SVID; its SVID is renewed through the new
// replica and chains to the bundle that replica publishes. Along the
// way, `replica list` shows the three replicas alive, then the killed one
// down, and `replica forget` refuses a live replica.
func TestTierReplicaKill9Failover(t *testing.T) {
	t.Parallel()
	agentTPM := swtpmtest.Start(t)
	tr := startTier(t, 3, tierPolicy([]*swtpmtest.TPM{agentTPM}, "20s", "svc"))
	a := tr.addAgent(t, agentTPM, tr.replicas...)
	rec := recordX509(t, a.socket)

	tr.waitReplicaStates(t, tr.replicas[0], map[string]string{"signer-1": "alive", "signer-2": "alive", "signer-3": "alive"})
	out, code := signerCmd(t, "replica", "forget", "signer-2", "--config", tr.replicas[0].cfg)
	if code == 0 || !strings.Contains(out, "alive") {
		t.Errorf("replica forget of a live replica: exit %d, want non-zero and a message saying it is alive:\n%s", code, out)
	}

	victim := tr.syncedTo(t, a)
	killed := time.Now()
	victim.kill9(t)
	var moved agentTierReport
	waitFor(t, 10*time.Second, "the agent synced to another replica", func() bool {
		r, err := a.status()
		if err != nil || !r.Signer.Connected || r.Signer.Address == victim.addr || tr.byAddr(r.Signer.Address) == nil {
			return false
		}
		moved = r
		return true
	})
	took := time.Since(killed)
	if s := moved.Signer.Since; s != nil && s.After(killed) {
		took = s.Sub(killed) // the agent's own instant, free of the poll's
	}
	t.Logf("MEASURED kill -9 of %s to the agent synced to %s: %v", victim.name, moved.Signer.Address, took.Round(time.Millisecond))
	if took > failoverBound {
		t.Errorf("the agent was synced to another replica %v after the kill, want within %v", took, failoverBound)
	}
	now := tr.byAddr(moved.Signer.Address)

	// A 20 s SVID is renewed about 10 s in: through the new replica.
	renewed := rec.renewedAfter(t, 30*time.Second, "an SVID signed after the kill", killed, 20*time.Second)
	if serial := renewed.x.DefaultSVID().Certificates[0].SerialNumber.Text(16); !strings.Contains(now.proc.out.String(), "serial="+serial) {
		t.Errorf("the SVID renewed after the kill (serial %s) was not signed by %s, the replica the agent moved to", serial, now.name)
	}
	published, err := x509bundle.Load(td, now.bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(renewed.x.DefaultSVID().Certificates, published); err != nil {
		t.Errorf("the SVID renewed through %s does not verify against its bundle file: %v", now.name, err)
	}

	want := map[string]string{"signer-1": "alive", "signer-2": "alive", "signer-3": "alive"}
	want[victim.name] = "down"
	tr.waitReplicaStates(t, now, want)
	rec.checkNoGap(t)
}

// waitReplicaStates waits until `replica list` through r shows each named
// replica in the given state ("alive" or "down"), on its line.
func (tr *tier) waitReplicaStates(t *testing.T, r *replica, want map[string]string) {
	t.Helper()
	var out string
	deadline := time.Now().Add(20 * time.Second)
	for {
		var code int
		out, code = signerCmd(t, "replica", "list", "--config", r.cfg)
		if code == 0 && replicaStatesMatch(out, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica list through %s: exit %d, want %v:\n%s", r.name, code, want, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// replicaStatesMatch says whether each named replica's line in out says
// its wanted state and not the other.
func replicaStatesMatch(out string, want map[string]string) bool {
	for name, state := range want {
		found := false
		for line := range strings.Lines(out) {
			if !slices.Contains(strings.Fields(line), name) {
				continue
			}
			found = true
			if !strings.Contains(line, state) || strings.Contains(line, map[string]string{"alive": "down", "down": "alive"}[state]) {
				return false
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// TestTierPolicyApplyReachesOtherReplica: `policy apply` through one
// replica reaches an agent synced to another within failoverBound (a new
// entry's SVID arrives on the workload's open stream), and every replica
// reports the new revision. Before that, an invalid file is refused with
// its file:line and changes nothing.
func TestTierPolicyApplyReachesOtherReplica(t *testing.T) {
	t.Parallel()
	tpms := []*swtpmtest.TPM{swtpmtest.Start(t)}
	tr := startTier(t, 3, tierPolicy(tpms, "1h", "svc"))
	a := tr.addAgent(t, tpms[0], tr.replicas...)
	synced := tr.syncedTo(t, a)
	via := tr.other(synced)
	rec := recordX509(t, a.socket)
	tr.waitRevision(t, 1)

	// Invalid: a workload names an unknown node, on the line computed.
	valid := tierPolicy(tpms, "1h", "svc")
	bad := filepath.Join(tr.dir, "bad.hcl")
	writeFile(t, bad, valid+`workload "broken" {
  spiffe_id = "spiffe://example.org/broken"
  nodes     = ["nope"]
  selectors = ["unix:uid:1"]
}
`)
	line := strings.Count(valid, "\n") + 3
	out, code := signerCmd(t, "policy", "apply", bad, "--config", via.cfg)
	if code != 1 || !strings.Contains(out, fmt.Sprintf("bad.hcl:%d:", line)) || !strings.Contains(out, "nope") {
		t.Errorf("policy apply of an invalid file: exit %d, want 1 and bad.hcl:%d naming the unknown node:\n%s", code, line, out)
	}
	if rev := policyShowRevision(t, synced); rev != 1 {
		t.Errorf("policy show after a refused apply: revision %d, want 1", rev)
	}

	good := filepath.Join(tr.dir, "good.hcl")
	writeFile(t, good, tierPolicy(tpms, "1h", "svc", "added"))
	added := spiffeid.RequireFromString("spiffe://example.org/added")
	applied := time.Now()
	out, code = signerCmd(t, "policy", "apply", good, "--config", via.cfg)
	if code != 0 || !strings.Contains(out, "policy revision 2 applied") {
		t.Fatalf("policy apply through %s: exit %d, want 0 and \"policy revision 2 applied\":\n%s", via.name, code, out)
	}
	var arrived time.Time
	waitFor(t, 10*time.Second, "the new entry's SVID on the workload's stream", func() bool {
		for _, u := range rec.snapshot() {
			if slices.ContainsFunc(u.x.SVIDs, func(s *x509svid.SVID) bool { return s.ID == added }) {
				arrived = u.at
				return true
			}
		}
		return false
	})
	took := arrived.Sub(applied)
	t.Logf("MEASURED policy apply through %s (command start) to the new SVID on a workload of an agent synced to %s: %v",
		via.name, synced.name, took.Round(time.Millisecond))
	if took > failoverBound {
		t.Errorf("the applied policy reached the agent %v after apply, want within %v", took, failoverBound)
	}
	tr.waitRevision(t, 2)
	if rev := policyShowRevision(t, synced); rev != 2 {
		t.Errorf("policy show through %s: revision %d, want 2", synced.name, rev)
	}
	x, err := workloadapi.FetchX509Context(ctxFor(t, 10*time.Second), workloadapi.WithAddr("unix://"+a.socket))
	if err != nil || !slices.ContainsFunc(x.SVIDs, func(s *x509svid.SVID) bool { return s.ID == added }) {
		t.Errorf("a fresh fetch after apply: %v, want an SVID for %s", err, added)
	}
	rec.checkNoGap(t)
}

// waitRevision waits until every running replica reports policy revision
// rev in its status.
func (tr *tier) waitRevision(t *testing.T, rev int64) {
	t.Helper()
	for _, r := range tr.replicas {
		if !r.proc.running() {
			continue
		}
		var last signerTierStatus
		waitFor(t, 10*time.Second, fmt.Sprintf("%s at policy revision %d", r.name, rev), func() bool {
			s, err := r.status()
			last = s
			return err == nil && s.PolicyRevision == rev
		})
		if last.Replica != r.name {
			t.Errorf("%s's status names replica %q", r.name, last.Replica)
		}
	}
}

// policyShowRevision is the revision `policy show --json` through r
// reports in force.
func policyShowRevision(t *testing.T, r *replica) int64 {
	t.Helper()
	out, code := signerCmd(t, "policy", "show", "--json", "--config", r.cfg)
	var show struct {
		Revision int64 `json:"revision"`
	}
	if err := json.Unmarshal([]byte(out), &show); code != 0 || err != nil {
		t.Errorf("policy show through %s: exit %d, %v:\n%s", r.name, code, err, out)
		return -1
	}
	return show.Revision
}

// TestTierNodeRevokeThroughOtherReplica: `node list` through any replica
// shows the agent and the replica it is connected to; `node revoke`
// through another replica cuts it off within failoverBound: its status
// says revoked, the replica it was synced to closes its stream and lists
// it revoked, and no replica takes it back.
func TestTierNodeRevokeThroughOtherReplica(t *testing.T) {
	t.Parallel()
	tpms := []*swtpmtest.TPM{swtpmtest.Start(t)}
	tr := startTier(t, 3, tierPolicy(tpms, "1h", "svc"))
	a := tr.addAgent(t, tpms[0], tr.replicas...)
	synced := tr.syncedTo(t, a)
	via := tr.other(synced)

	var node tierNode
	waitFor(t, 10*time.Second, fmt.Sprintf("node list through %s showing the agent on %s", via.name, synced.name), func() bool {
		ns := via.nodes(t)
		if len(ns) != 1 || !ns[0].Connected || ns[0].Replica != synced.name {
			return false
		}
		node = ns[0]
		return true
	})

	revoked := time.Now()
	out, code := signerCmd(t, "node", "revoke", node.AgentID, "--reason", "host stolen", "--config", via.cfg)
	if code != 0 {
		t.Fatalf("node revoke through %s: exit %d\n%s", via.name, code, out)
	}
	var at time.Time
	waitFor(t, 10*time.Second, "the agent's status saying revoked", func() bool {
		r, err := a.status()
		at = time.Now()
		return err == nil && slices.Contains(r.Reasons, "revoked by the signer: host stolen")
	})
	took := at.Sub(revoked)
	t.Logf("MEASURED node revoke through %s (command start) to the agent synced to %s reporting it: %v",
		via.name, synced.name, took.Round(time.Millisecond))
	if took > failoverBound {
		t.Errorf("the agent reported the revocation %v after the command, want within %v", took, failoverBound)
	}
	synced.proc.waitLog(t, 5*time.Second, "sync stream closed: node revoked")
	for _, r := range tr.replicas {
		waitFor(t, 5*time.Second, "node list through "+r.name+" showing the node revoked", func() bool {
			ns := r.nodes(t)
			return len(ns) == 1 && ns[0].Revoked != nil && ns[0].Revoked.Reason == "host stolen"
		})
	}
	// The agent tries the others: each refuses it.
	waitFor(t, 15*time.Second, "a replica refusing the revoked agent", func() bool {
		for _, r := range tr.replicas {
			if strings.Contains(r.proc.out.String(), "call refused: node revoked") {
				return true
			}
		}
		return false
	})
	if out, code := agentCmd(t, nil, "status", "--config", a.cfg); code != 2 || !strings.Contains(out, "revoked by the signer: host stolen") {
		t.Errorf("agent status after revoke: exit %d, want 2 and the reason:\n%s", code, out)
	}
	if r, err := a.status(); err != nil || r.Signer.Connected {
		t.Errorf("agent status after revoke: %+v, %v; want it synced to no replica", r.Signer, err)
	}
}

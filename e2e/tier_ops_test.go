package e2e

import (
	"crypto/x509"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// applyUntil runs `policy apply file` through r until it succeeds or d
// passes, and returns its output and how many attempts failed. Every
// failure must be the precise one: exit 1, "etcd unavailable".
func applyUntil(t *testing.T, r *replica, file string, d time.Duration) (string, int) {
	t.Helper()
	deadline := time.Now().Add(d)
	for failed := 0; ; failed++ {
		out, code := signerCmd(t, "policy", "apply", file, "--config", r.cfg)
		if code == 0 {
			return out, failed
		}
		if code != 1 || !strings.Contains(out, "etcd unavailable") {
			t.Errorf("policy apply while etcd recovers: exit %d, want 1 and \"etcd unavailable\":\n%s", code, out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("policy apply through %s still failing %v on: exit %d\n%s", r.name, d, code, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitEntry waits for an update of rec that carries an SVID for id.
func (r *x509Recorder) waitEntry(t *testing.T, d time.Duration, id spiffeid.ID) {
	t.Helper()
	waitFor(t, d, id.String()+"'s SVID on the workload's stream", func() bool {
		for _, u := range r.snapshot() {
			if slices.ContainsFunc(u.x.SVIDs, func(s *x509svid.SVID) bool { return s.ID == id }) {
				return true
			}
		}
		return false
	})
}

// TestTierEtcdLeaderKill: the etcd leader is killed under a tier.
// Signing and streaming go on (a 10 s SVID is renewed), and `policy
// apply`, retried for at most 10 s, works once a new leader is elected.
// Then quorum is lost too: apply is refused with "etcd unavailable",
// status says etcd is down, and signing still goes on; with etcd back,
// the replicas catch up without a restart and apply works again.
func TestTierEtcdLeaderKill(t *testing.T) {
	t.Parallel()
	tpms := []*swtpmtest.TPM{swtpmtest.Start(t)}
	tr := startTier(t, 3, tierPolicy(tpms, "10s", "svc"))
	a := tr.addAgent(t, tpms[0], tr.replicas...)
	rec := recordX509(t, a.socket)
	tr.waitRevision(t, 1)
	via := tr.replicas[0]

	leader := tr.etcd.WaitLeader()
	killed := time.Now()
	tr.etcd.Kill(leader)
	file := filepath.Join(tr.dir, "rev2.hcl")
	writeFile(t, file, tierPolicy(tpms, "10s", "svc", "second"))
	out, failed := applyUntil(t, via, file, 10*time.Second)
	t.Logf("MEASURED etcd leader killed to policy apply working: %v (%d refused attempts)", time.Since(killed).Round(time.Millisecond), failed)
	if !strings.Contains(out, "policy revision 2 applied") {
		t.Errorf("policy apply after the election printed:\n%s", out)
	}
	rec.waitEntry(t, 5*time.Second, spiffeid.RequireFromString("spiffe://example.org/second"))
	tr.waitRevision(t, 2)
	rec.waitSVID(t, 15*time.Second, "an SVID renewed after the leader was killed", func(leaf *x509.Certificate) bool {
		return leaf.NotBefore.After(killed)
	})

	// No quorum: one member of three left.
	second := tr.etcd.WaitLeader()
	lost := time.Now()
	tr.etcd.Kill(second)
	file3 := filepath.Join(tr.dir, "rev3.hcl")
	writeFile(t, file3, tierPolicy(tpms, "10s", "svc", "second", "third"))
	out, code := signerCmd(t, "policy", "apply", file3, "--config", via.cfg)
	if code != 1 || !strings.Contains(out, "etcd unavailable") {
		t.Errorf("policy apply without quorum: exit %d, want 1 and \"etcd unavailable\":\n%s", code, out)
	}
	if rev := policyShowRevision(t, via); rev != 2 {
		t.Errorf("policy show without quorum: revision %d, want 2 (the one in force)", rev)
	}
	waitFor(t, 15*time.Second, via.name+"'s status saying etcd is down", func() bool {
		s, err := via.status()
		return err == nil && !s.Etcd.OK && s.Etcd.Error != ""
	})
	rec.waitSVID(t, 15*time.Second, "an SVID renewed without etcd quorum", func(leaf *x509.Certificate) bool {
		return leaf.NotBefore.After(lost)
	})

	tr.etcd.Restart(second)
	tr.etcd.Restart(leader)
	if out, _ := applyUntil(t, via, file3, 15*time.Second); !strings.Contains(out, "policy revision 3 applied") {
		t.Errorf("policy apply with etcd back printed:\n%s", out)
	}
	rec.waitEntry(t, 5*time.Second, spiffeid.RequireFromString("spiffe://example.org/third"))
	tr.waitRevision(t, 3)
	for _, r := range tr.replicas {
		waitFor(t, 10*time.Second, r.name+"'s status saying etcd is back", func() bool {
			s, err := r.status()
			return err == nil && s.Etcd.OK
		})
	}
	rec.checkNoGap(t)
}

// TestTierJoinPublishesCAFirst: a fourth replica joins (fresh swtpm,
// fresh state). Its CA reaches the workloads of an agent synced to the
// other replicas before it signs anything: the instant the new CA arrives
// in that workload's bundle precedes the new replica's first signature,
// and every SVID it signs (for an agent that knows only it) verifies
// against that workload's bundle.
func TestTierJoinPublishesCAFirst(t *testing.T) {
	t.Parallel()
	tpmA, tpmB := swtpmtest.Start(t), swtpmtest.Start(t)
	tr := startTier(t, 3, tierPolicy([]*swtpmtest.TPM{tpmA, tpmB}, "1h", "svc"))
	a := tr.addAgent(t, tpmA, tr.replicas...)
	recA := recordX509(t, a.socket)
	before := bundleCAs(recA.latest().x)

	r4 := tr.addReplica(t)
	r4.start(t)
	var newCA *x509.Certificate
	var caAt time.Time
	waitFor(t, 30*time.Second, "the new replica's CA in the workload's bundle", func() bool {
		for _, u := range recA.snapshot() {
			for _, c := range u.x.Bundles.Bundles() {
				for _, ca := range c.X509Authorities() {
					if !before[string(ca.Raw)] {
						newCA, caAt = ca, u.at
						return true
					}
				}
			}
		}
		return false
	})
	r4.waitServing(t)
	r4.waitBundle(t, 4)
	b := tr.addAgent(t, tpmB, r4)
	recB := recordX509(t, b.socket)

	out := r4.proc.out.String()
	signedAt := logTime(t, out, "agent attested")
	if strings.Contains(out, "x509-svid signed") {
		if s := logTime(t, out, "x509-svid signed"); s.Before(signedAt) {
			signedAt = s
		}
	}
	t.Logf("MEASURED new CA in the workload's bundle %v before %s first signed", signedAt.Sub(caAt).Round(time.Millisecond), r4.name)
	if !caAt.Before(signedAt) {
		t.Errorf("%s signed at %s, before its CA reached the other agent's workloads (%s)",
			r4.name, signedAt.Format(time.StampMilli), caAt.Format(time.StampMilli))
	}
	peers := recA.latest().x.Bundles
	for _, u := range recB.snapshot() {
		s := u.x.DefaultSVID()
		if err := s.Certificates[0].CheckSignatureFrom(newCA); err != nil {
			t.Errorf("SVID %x from the agent of %s is not signed by its new CA: %v", s.Certificates[0].SerialNumber, r4.name, err)
		}
		if _, _, err := x509svid.Verify(s.Certificates, peers); err != nil {
			t.Errorf("SVID %x signed by %s does not verify against a peer workload's bundle: %v", s.Certificates[0].SerialNumber, r4.name, err)
		}
	}
	tr.waitReplicaStates(t, r4, map[string]string{"signer-1": "alive", "signer-2": "alive", "signer-3": "alive", "signer-4": "alive"})
	recA.checkNoGap(t)
}

// bundleCAs is the set of CA certificates (DER) in x's bundles.
func bundleCAs(x *workloadapi.X509Context) map[string]bool {
	out := map[string]bool{}
	for _, b := range x.Bundles.Bundles() {
		for _, c := range b.X509Authorities() {
			out[string(c.Raw)] = true
		}
	}
	return out
}

// term stops the replica as systemd does (SIGTERM) and waits for it.
func (r *replica) term(t *testing.T) {
	t.Helper()
	r.proc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.proc.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not stop within 10s of SIGTERM", r.name)
	}
}

// TestTierRollingRestart: each replica in turn is stopped (SIGTERM) and
// started again, the next one only once it serves. A workload streaming
// 10 s SVIDs sees no error and holds a valid SVID at every instant, its
// SVIDs are renewed during the restarts, and its bundle ends as it began
// (each replica's keys are sealed to its TPM).
func TestTierRollingRestart(t *testing.T) {
	t.Parallel()
	tpms := []*swtpmtest.TPM{swtpmtest.Start(t)}
	tr := startTier(t, 3, tierPolicy(tpms, "10s", "svc"))
	a := tr.addAgent(t, tpms[0], tr.replicas...)
	rec := recordX509(t, a.socket)
	before := bundleCAs(rec.latest().x)

	began := time.Now()
	for _, r := range tr.replicas {
		r.term(t)
		r.start(t)
		r.waitServing(t)
		waitFor(t, 10*time.Second, r.name+" linked to etcd again", func() bool {
			s, err := r.status()
			return err == nil && s.Etcd.OK
		})
	}
	t.Logf("rolling restart of 3 replicas took %v", time.Since(began).Round(time.Millisecond))
	rec.waitSVID(t, 15*time.Second, "an SVID renewed during the rolling restart", func(leaf *x509.Certificate) bool {
		return leaf.NotBefore.After(began)
	})
	tr.syncedTo(t, a)
	if after := bundleCAs(rec.latest().x); !maps.Equal(after, before) {
		t.Errorf("the workload's bundle changed across the rolling restart: %d CAs before, %d after", len(before), len(after))
	}
	updates := rec.checkNoGap(t)
	t.Logf("the workload saw %d updates", len(updates))
}

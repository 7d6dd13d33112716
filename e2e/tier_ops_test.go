package e2e

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/lanyard-dev/lanyard/signer/store"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	clientv3 "go.etcd.io/etcd/client/v3"
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
	rec.renewedAfter(t, 15*time.Second, "an SVID renewed after the leader was killed", killed, 10*time.Second)

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
	rec.renewedAfter(t, 15*time.Second, "an SVID renewed without etcd quorum", lost, 10*time.Second)

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
// other replicas before it signs anything. A second agent, which knows
// only the new replica, starts the moment that replica's CA is in etcd
// (so a replica that signed at once would be caught): the first
// signature of the new replica comes after its CA arrived in the first
// agent's workload bundle, and at least ca_publish_lead after it was
// published; every SVID it signs verifies against a peer workload's
// bundle.
func TestTierJoinPublishesCAFirst(t *testing.T) {
	t.Parallel()
	tpmA, tpmB := swtpmtest.Start(t), swtpmtest.Start(t)
	tr := startTier(t, 3, tierPolicy([]*swtpmtest.TPM{tpmA, tpmB}, "1h", "svc"))
	a := tr.addAgent(t, tpmA, tr.replicas...)
	recA := recordX509(t, a.socket)

	r4 := tr.addReplica(t)
	r4.start(t)
	cas, publishedAt := tr.publishedCAs(t, r4.name)
	b := tr.addAgentTrusting(t, tpmB, cas, r4)
	recB := recordX509(t, b.socket)

	out := r4.proc.out.String()
	signedAt := logTime(t, out, "agent attested")
	if strings.Contains(out, "x509-svid signed") {
		if s := logTime(t, out, "x509-svid signed"); s.Before(signedAt) {
			signedAt = s
		}
	}
	newCA := issuerIn(t, recB.latest().x.DefaultSVID().Certificates[0], cas)
	var caAt time.Time
	for _, u := range recA.snapshot() {
		if bundleCAs(u.x)[string(newCA.Raw)] {
			caAt = u.at
			break
		}
	}
	if caAt.IsZero() {
		t.Fatalf("%s's CA never reached the other agent's workload, yet %s signed with it", r4.name, r4.name)
	}
	t.Logf("MEASURED %s: CA in etcd at %s, in a peer workload's bundle at %s, first signature at %s",
		r4.name, publishedAt.Format(time.StampMilli), caAt.Format(time.StampMilli), signedAt.Format(time.StampMilli))
	if !caAt.Before(signedAt) {
		t.Errorf("%s signed at %s, before its CA reached the other agent's workloads (%s)",
			r4.name, signedAt.Format(time.StampMilli), caAt.Format(time.StampMilli))
	}
	// The lead is a floor: load only makes the first signature later. The
	// slack covers this test's poll of etcd.
	lead, _ := time.ParseDuration(tierPublishLead)
	if got := signedAt.Sub(publishedAt); got < lead-500*time.Millisecond {
		t.Errorf("%s signed %v after publishing its CA, want at least ca_publish_lead (%v)", r4.name, got, lead)
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
	r4.waitBundle(t, 4)
	tr.waitReplicaStates(t, r4, map[string]string{"signer-1": "alive", "signer-2": "alive", "signer-3": "alive", "signer-4": "alive"})
	recA.checkNoGap(t)
	recB.checkNoGap(t)
}

// publishedCAs waits until replica name's record in etcd lists a CA
// certificate, and returns its CAs and when the test first saw them.
func (tr *tier) publishedCAs(t *testing.T, name string) ([]*x509.Certificate, time.Time) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: tr.etcd.Endpoints(), DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	var cas []*x509.Certificate
	waitFor(t, 30*time.Second, name+"'s CA in etcd", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		resp, err := cli.Get(ctx, tierPrefix+"/replicas/"+name)
		if err != nil || len(resp.Kvs) == 0 {
			return false
		}
		var rec store.ReplicaRecord
		if err := json.Unmarshal(resp.Kvs[0].Value, &rec); err != nil {
			t.Fatalf("%s's record in etcd: %v", name, err)
		}
		cas = nil
		for _, k := range rec.Keys {
			if len(k.CertDER) == 0 {
				continue
			}
			c, err := x509.ParseCertificate(k.CertDER)
			if err != nil {
				t.Fatalf("%s's record in etcd: %v", name, err)
			}
			cas = append(cas, c)
		}
		return len(cas) > 0
	})
	return cas, time.Now()
}

// issuerIn is the CA of cas that signed leaf.
func issuerIn(t *testing.T, leaf *x509.Certificate, cas []*x509.Certificate) *x509.Certificate {
	t.Helper()
	for _, c := range cas {
		if leaf.CheckSignatureFrom(c) == nil {
			return c
		}
	}
	t.Fatalf("SVID %x is signed by none of the %d CAs its replica published", leaf.SerialNumber, len(cas))
	return nil
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
// started again, the next one only once it serves, round after round
// until the workload's 10 s SVIDs have been renewed twice meanwhile (a
// round takes well under a second, a renewal comes every 5 s or so). The
// workload sees no error and holds a valid SVID at every instant, and its
// bundle never changes (each replica's keys are sealed to its TPM, and a
// replica down for a moment stays in the union).
func TestTierRollingRestart(t *testing.T) {
	t.Parallel()
	tpms := []*swtpmtest.TPM{swtpmtest.Start(t)}
	tr := startTier(t, 3, tierPolicy(tpms, "10s", "svc"))
	a := tr.addAgent(t, tpms[0], tr.replicas...)
	rec := recordX509(t, a.socket)
	before := bundleCAs(rec.latest().x)

	began := time.Now()
	deadline := began.Add(30 * time.Second)
	rounds := 0
	for ; rounds < 100 && rec.renewalsSince(began) < 2; rounds++ {
		if time.Now().After(deadline) {
			t.Fatalf("two renewals did not happen in %d rounds of restarts (30 s)", rounds)
		}
		for _, r := range tr.replicas {
			r.term(t)
			r.start(t)
			r.waitServing(t)
			waitFor(t, 10*time.Second, r.name+" linked to etcd again", func() bool {
				s, err := r.status()
				return err == nil && s.Etcd.OK
			})
		}
	}
	t.Logf("%d rounds of rolling restarts in %v, %d renewals meanwhile", rounds, time.Since(began).Round(time.Millisecond), rec.renewalsSince(began))
	tr.syncedTo(t, a)
	if after := bundleCAs(rec.latest().x); !maps.Equal(after, before) {
		t.Errorf("the workload's bundle changed across the rolling restarts: %d CAs before, %d after", len(before), len(after))
	}
	updates := rec.checkNoGap(t)
	// A replica down for a moment keeps its CA in the union: a peer
	// holding an SVID it signed is still verifiable.
	for i, u := range updates {
		if got := bundleCAs(u.x); !maps.Equal(got, before) {
			t.Errorf("update %d at %s: the workload's bundle has %d CAs, not the %d it began with", i, u.at.Format(time.StampMilli), len(got), len(before))
		}
	}
	t.Logf("the workload saw %d updates", len(updates))
}

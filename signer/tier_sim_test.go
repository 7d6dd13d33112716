//go:build cgo

package signer

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/etcdtest"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tierExtra is the config lines of replica name of a tier on etcd: a CA
// publish lead of 2s, so a joining replica waits that long.
func tierExtra(c *etcdtest.Cluster, name string) string {
	return fmt.Sprintf("replica_name = %q\nca_ttl = \"1h\"\nca_publish_lead = \"2s\"\netcd {\n  endpoints = [\"%s\"]\n  prefix = \"/lanyard/example.org\"\n}\n",
		name, strings.Join(c.Endpoints(), `", "`))
}

// bundleCAs reads a bundle_path file.
func bundleCAs(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := x509bundle.Load(testTD, path)
	if err != nil {
		t.Fatal(err)
	}
	return b.X509Authorities()
}

// within polls cond every 10ms for d at most.
func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTierReplicasShareState runs two replicas on a real three-member etcd
// cluster: the first seeds the policy and signs at once; the second joins,
// publishes its CA and serves only ca_publish_lead later; both bundles are
// the union; an agent attested with either is known to both registries; a
// policy applied through one is in force on the other within a second, and
// a revocation through one ends the agent's Sync stream on the other.
func TestTierReplicasShareState(t *testing.T) {
	c := etcdtest.Start(t, 3)
	a := newSimAgent(t)
	ra := serveTestSigner(t, nodePolicy(a.ek), tierExtra(c, "ra"))
	if st := ra.Status(time.Now()); st.TierStatus == nil || st.PolicyRevision != 1 || !st.Etcd.OK {
		t.Fatalf("first replica's tier status = %+v, want policy revision 1 seeded, etcd ok", st.TierStatus)
	}

	start := time.Now()
	rb := serveTestSigner(t, "", tierExtra(c, "rb")) // its own policy file is ignored: etcd has one
	if waited := time.Since(start); waited < 2*time.Second {
		t.Errorf("joining replica served after %s, before its 2s publish lead", waited)
	}
	caA, caB := ra.Status(time.Now()).CAs, rb.Status(time.Now()).CAs
	if len(caA) != 1 || len(caB) != 1 {
		t.Fatalf("own CAs: ra %d, rb %d, want 1 each", len(caA), len(caB))
	}
	for _, s := range []*servedSigner{ra, rb} {
		s := s
		within(t, time.Second, "both CAs in "+s.cfg.ReplicaName+"'s bundle_path", func() bool { return len(bundleCAs(t, s.cfg.BundlePath)) == 2 })
	}
	if got := rb.PolicyStatus(); got.Revision != 1 || !strings.Contains(got.Source, a.ek) {
		t.Errorf("rb's policy = revision %d %q, want ra's seeded revision 1", got.Revision, got.Source)
	}

	// The agent attests with ra, then syncs with rb: rb asks it to attest
	// there (agent records are per replica), and accepts its ra-signed
	// SVID at the TLS layer.
	svidA, err := a.attest(t, ra.dial(t, "127.0.0.1"), "v1")
	if err != nil {
		t.Fatalf("attest with ra: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	stB, err := signerpb.NewSignerClient(rb.dialAs(t, "127.0.0.1", svidA)).Sync(ctx, &signerpb.SyncRequest{})
	if err == nil {
		_, err = stB.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("Sync on rb with ra's attestation = %v, want Unauthenticated (attest again)", err)
	}
	within(t, time.Second, "rb's registry knows the agent attested with ra", func() bool {
		return slices.ContainsFunc(rb.Nodes(), func(n NodeInfo) bool { return n.EKSHA256 == a.ek })
	})
	svidB, err := a.attest(t, rb.dial(t, "127.0.0.1"), "v1")
	if err != nil {
		t.Fatalf("attest with rb: %v", err)
	}
	stB, err = signerpb.NewSignerClient(rb.dialAs(t, "127.0.0.1", svidB)).Sync(ctx, &signerpb.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stB.Recv()
	if err != nil {
		t.Fatalf("Sync on rb: %v", err)
	}
	if len(first.GetEntries()) != 1 || len(first.GetBundle().GetX509Authorities()) != 2 || len(first.GetBundle().GetJwtAuthorities()) != 2 {
		t.Errorf("rb's first sync: %d entries, %d CAs, %d JWT keys; want 1, 2, 2", len(first.GetEntries()),
			len(first.GetBundle().GetX509Authorities()), len(first.GetBundle().GetJwtAuthorities()))
	}
	within(t, time.Second, "ra's node list shows the agent connected to rb", func() bool {
		i := slices.IndexFunc(ra.Nodes(), func(n NodeInfo) bool { return n.EKSHA256 == a.ek })
		return i >= 0 && ra.Nodes()[i].Connected && ra.Nodes()[i].Replica == "rb"
	})

	// A policy applied through ra reaches the agent on rb.
	src := nodePolicy(a.ek) + "workload \"db\" {\n  spiffe_id = \"spiffe://example.org/db\"\n  nodes = [\"lab\"]\n  selectors = [\"unix:uid:5\"]\n}\n"
	applied := time.Now()
	ps, err := ra.ApplyPolicy(t.Context(), PolicyApply{Filename: "/etc/lanyard/policy.hcl", Source: src}, 0)
	if err != nil || ps.Revision != 2 || ps.Latest != 2 || ps.Applied != 2 {
		t.Fatalf("ApplyPolicy = %+v, %v; want revision 2 in force", ps, err)
	}
	next, err := stB.Recv()
	if err != nil || len(next.GetEntries()) != 2 {
		t.Fatalf("rb's sync after the apply: %d entries, %v; want 2", len(next.GetEntries()), err)
	}
	if d := time.Since(applied); d > time.Second {
		t.Errorf("policy applied through ra reached rb's agent after %s", d)
	}
	// An invalid policy is refused with file:line and changes nothing.
	if _, err := ra.ApplyPolicy(t.Context(), PolicyApply{Filename: "/p.hcl", Source: "workload \"x\" {\n  nodes = [\"nope\"]\n}\n"}, 0); !errors.Is(err, ErrBadPolicy) || !strings.Contains(err.Error(), "/p.hcl:1") {
		t.Errorf("invalid ApplyPolicy = %v, want ErrBadPolicy with /p.hcl:1", err)
	}
	if got := rb.PolicyStatus(); got.Revision != 2 || got.Latest != 2 {
		t.Errorf("after a refused apply rb has revision %d (etcd %d), want 2", got.Revision, got.Latest)
	}

	// A revocation through ra ends the agent's Sync stream on rb.
	if _, err := ra.Revoke(a.ek, "stolen laptop", 0); err != nil {
		t.Fatalf("Revoke through ra: %v", err)
	}
	revoked := time.Now()
	for {
		_, err := stB.Recv()
		if err != nil {
			wantRevoked(t, "rb's Sync after revoke through ra", err, "stolen laptop")
			break
		}
	}
	if d := time.Since(revoked); d > time.Second {
		t.Errorf("revocation through ra ended rb's stream after %s", d)
	}
	if _, err := rb.Revoke(a.ek, "again", 0); !errors.Is(err, ErrAlreadyRevoked) {
		t.Errorf("second revoke through rb = %v, want ErrAlreadyRevoked", err)
	}

	// A token revocation through ra is in force on rb (and pushed to its
	// agents) within a second; the same jti again, through rb, is refused.
	if _, err := ra.RevokeToken(TokenRevokeRequest{JTI: "leakedTokenID", Reason: "pasted in a ticket"}, 0); err != nil {
		t.Fatalf("RevokeToken through ra: %v", err)
	}
	within(t, time.Second, "ra's token revocation in force on rb", func() bool {
		revs := rb.TokenRevocations()
		return len(revs) == 1 && revs[0].JTI == "leakedTokenID" && revs[0].Reason == "pasted in a ticket"
	})
	if _, err := rb.RevokeToken(TokenRevokeRequest{JTI: "leakedTokenID", Reason: "again"}, 0); !errors.Is(err, ErrTokenAlreadyRevoked) {
		t.Errorf("the same jti revoked through rb = %v, want ErrTokenAlreadyRevoked", err)
	}

	// replica list, and forget.
	rs, err := ra.Replicas()
	if err != nil || len(rs) != 2 || !rs[0].Alive || !rs[1].Alive || !rs[0].Self || rs[1].Name != "rb" {
		t.Fatalf("Replicas = %+v, %v; want ra (self) and rb alive", rs, err)
	}
	if err := ra.ForgetReplica(t.Context(), "rb"); !errors.Is(err, ErrReplicaAlive) {
		t.Errorf("forget a live replica = %v, want ErrReplicaAlive", err)
	}
	if err := ra.ForgetReplica(t.Context(), "ra"); !errors.Is(err, ErrReplicaAlive) {
		t.Errorf("forget self = %v, want ErrReplicaAlive", err)
	}
	if err := ra.ForgetReplica(t.Context(), "nobody"); !errors.Is(err, ErrUnknownReplica) {
		t.Errorf("forget an unknown replica = %v, want ErrUnknownReplica", err)
	}
	if err := rb.stop(); err != nil {
		t.Fatalf("stop rb: %v", err)
	}
	within(t, 2*time.Second, "rb down in ra's replica list once stopped", func() bool {
		rs, _ := ra.Replicas()
		return len(rs) == 2 && !rs[1].Alive
	})
	// A replica that is down keeps its CA in the bundle: what it signed lives on.
	if n := len(bundleCAs(t, ra.cfg.BundlePath)); n != 2 {
		t.Errorf("ra's bundle has %d CAs after rb stopped, want 2 (rb's SVIDs live on)", n)
	}
	if err := ra.ForgetReplica(t.Context(), "rb"); err != nil {
		t.Errorf("forget a stopped replica: %v", err)
	}
	within(t, time.Second, "rb forgotten in the list, kept while its keys live", func() bool {
		rs, _ := ra.Replicas()
		return len(rs) == 2 && rs[1].Forgotten && len(rs[1].Keys) == 2
	})
}

// TestTierEtcdOutage: with every etcd member down, a replica keeps
// attesting and signing, reports etcd unavailable in status and /ready,
// and refuses policy apply and node revoke with a clear error; when etcd
// is back it catches up with a change made meanwhile, without a restart.
func TestTierEtcdOutage(t *testing.T) {
	c := etcdtest.Start(t, 3)
	a := newSimAgent(t)
	ra := serveTestSigner(t, nodePolicy(a.ek), tierExtra(c, "ra"))
	if _, err := a.attest(t, ra.dial(t, "127.0.0.1"), "v1"); err != nil {
		t.Fatalf("attest: %v", err)
	}
	for i := range 3 {
		c.Kill(i)
	}
	within(t, 5*time.Second, "etcd unavailable in status", func() bool { return !ra.Status(time.Now()).Etcd.OK })
	if code, body := ra.readiness(); code != 200 || !strings.HasPrefix(body, "degraded: etcd unavailable") {
		t.Errorf("/ready = %d %q, want 200 degraded", code, body)
	}
	if _, err := a.attest(t, ra.dial(t, "127.0.0.1"), "v1"); err != nil {
		t.Errorf("attest with etcd down: %v", err)
	}
	if _, err := ra.ApplyPolicy(t.Context(), PolicyApply{Filename: "/p.hcl", Source: nodePolicy(a.ek)}, 0); !errors.Is(err, ErrEtcdUnavailable) {
		t.Errorf("ApplyPolicy with etcd down = %v, want ErrEtcdUnavailable", err)
	}
	if _, err := ra.Revoke(a.ek, "gone", 0); !errors.Is(err, ErrEtcdUnavailable) {
		t.Errorf("Revoke with etcd down = %v, want ErrEtcdUnavailable", err)
	}
	if _, err := ra.RevokeToken(TokenRevokeRequest{SPIFFEID: "spiffe://example.org/web", Reason: "gone"}, 0); !errors.Is(err, ErrEtcdUnavailable) {
		t.Errorf("RevokeToken with etcd down = %v, want ErrEtcdUnavailable", err)
	}
	if revs := ra.TokenRevocations(); len(revs) != 0 {
		t.Errorf("a refused token revocation is in force: %+v", revs)
	}
	if n := ra.Nodes(); len(n) != 1 || n[0].Revoked != nil {
		t.Errorf("a refused revoke changed the registry: %+v", n)
	}
	for i := range 3 {
		go c.Restart(i)
	}
	within(t, 20*time.Second, "etcd back in status", func() bool { return ra.Status(time.Now()).Etcd.OK })
	if _, err := ra.ApplyPolicy(t.Context(), PolicyApply{Filename: "/p.hcl", Source: nodePolicy(a.ek)}, 0); err != nil {
		t.Fatalf("ApplyPolicy after etcd is back: %v", err)
	}
	if got := ra.PolicyStatus(); got.Revision != 2 {
		t.Errorf("policy revision after etcd came back = %d, want 2", got.Revision)
	}
}

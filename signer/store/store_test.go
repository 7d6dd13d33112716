package store

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

var (
	t0       = time.Date(2026, 8, 1, 12, 0, 0, 0, time.UTC)
	stateCmp = cmp.Options{
		cmpopts.IgnoreFields(State{}, "Revision", "Full", "NodesChanged"),
		cmpopts.IgnoreFields(ReplicaRecord{}, "ModRevision"),
		cmpopts.EquateEmpty(),
	}
)

func policyRec(src string) PolicyRecord {
	return PolicyRecord{Filename: "/etc/lanyard/policy.hcl", Source: src, AppliedAt: t0, AppliedBy: "r1, uid 0",
		Files: map[string][]byte{"/etc/lanyard/ek-ca.pem": []byte("-----BEGIN CERTIFICATE-----\n")}}
}

// TestSnapshotAndWatch: Run hands out the state loaded at one revision,
// then one new State per watch batch, for every kind of record; records
// that do not decode are skipped with a warning that is not repeated; a
// State handed out never changes afterwards.
func TestSnapshotAndWatch(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	a := open(t, c.Endpoints(), "/lanyard/snap")

	// Before Run: the snapshot.
	if ok, err := a.SeedPolicy(ctx(t), policyRec("# one")); !ok || err != nil {
		t.Fatalf("SeedPolicy = %v, %v", ok, err)
	}
	rep := ReplicaRecord{Name: "r1", Address: "10.0.1.1:8443", Updated: t0,
		Keys: []PublicKey{{CertDER: []byte{1, 2}, KeepUntil: t0, Phase: "active"}, {JWTKeyPKIX: []byte{3}, KID: "k1", KeepUntil: t0, Phase: "next"}}}
	if err := a.PublishReplica(ctx(t), rep); err != nil {
		t.Fatal(err)
	}
	alive := AliveRecord{Name: "r1", Address: "10.0.1.1:8443", Since: t0, Version: "v1"}
	if err := a.Register(t.Context(), alive); err != nil {
		t.Fatal(err)
	}
	rev := Revocation{Reason: "stolen", At: t0, ByUID: 0, ByReplica: "r1"}
	if err := a.Revoke(ctx(t), ek("a"), rev); err != nil {
		t.Fatal(err)
	}
	node := NodeRecord{EKSHA256: ek("b"), AgentID: "spiffe://example.org/lanyard/agent/tpm/" + ek("b"), Nodes: []string{"lab"},
		FirstAttested: t0, LastAttested: t0, Replica: "r1"}
	if err := a.PutNode(ctx(t), node); err != nil {
		t.Fatal(err)
	}
	// Keys another writer could leave under the prefix.
	bad := map[string]string{
		"/lanyard/snap/nodes/" + ek("c"):   "{",
		"/lanyard/snap/other/x":            "y",
		"/lanyard/snap/revoked/" + ek("d"): `{"reason":"` + strings.Repeat("x", MaxRecordSize) + `"}`,
		"/lanyard/snap/alive/a/b":          "{}",
	}
	for k, v := range bad {
		if _, err := a.cli.Put(ctx(t), k, v); err != nil {
			t.Fatal(err)
		}
	}

	f := follow(t, a.Store)
	seeded := policyRec("# one")
	seeded.Revision = 1
	wantSnap := State{
		Policy:   &seeded,
		Replicas: map[string]ReplicaRecord{"r1": rep},
		Alive:    map[string]AliveRecord{"r1": alive},
		Revoked:  map[string]Revocation{ek("a"): rev},
		Nodes:    map[string]NodeRecord{ek("b"): node},
	}
	snap := f.waitFor(t, "the snapshot", func(State) bool { return true })
	if diff := cmp.Diff(wantSnap, snap, stateCmp); diff != "" {
		t.Fatalf("snapshot (-want +got):\n%s", diff)
	}
	if !snap.Full || snap.NodesChanged != nil {
		t.Errorf("snapshot: Full %v, NodesChanged %v; want a full load naming no change", snap.Full, snap.NodesChanged)
	}
	if snap.Revision == 0 || snap.Replicas["r1"].ModRevision == 0 {
		t.Errorf("snapshot revision %d, replica mod revision %d: want both set", snap.Revision, snap.Replicas["r1"].ModRevision)
	}

	// After Run: every kind through the watch.
	if _, err := a.Unrevoke(ctx(t), ek("a")); err != nil {
		t.Fatal(err)
	}
	rev2 := Revocation{Reason: "decommissioned", At: t0, ByUID: 1000, ByReplica: "r1"}
	if err := a.Revoke(ctx(t), ek("e"), rev2); err != nil {
		t.Fatal(err)
	}
	node.LastAttested = t0.Add(time.Hour)
	if err := a.PutNode(ctx(t), node); err != nil {
		t.Fatal(err)
	}
	rep2 := ReplicaRecord{Name: "r2", Address: "10.0.1.2:8443", Updated: t0}
	if err := a.PublishReplica(ctx(t), rep2); err != nil {
		t.Fatal(err)
	}
	if err := a.Forget(ctx(t), "r2"); err != nil {
		t.Fatal(err)
	}
	if r, err := a.ApplyPolicy(ctx(t), policyRec("# two")); r != 2 || err != nil {
		t.Fatalf("ApplyPolicy = %d, %v; want 2", r, err)
	}
	// The same bad key again: no second warning within the interval.
	if _, err := a.cli.Put(ctx(t), "/lanyard/snap/nodes/"+ek("c"), "[]"); err != nil {
		t.Fatal(err)
	}
	applied := policyRec("# two")
	applied.Revision = 2
	final := f.waitFor(t, "policy revision 2", func(st State) bool { return st.Policy != nil && st.Policy.Revision == 2 })
	// Every watched state names the node and revocation records its batch
	// changed: a, e (revocations) and b (a node) by now, and nothing else
	// (c, rewritten after the apply, may follow).
	changed := map[string]bool{}
	f.mu.Lock()
	for _, st := range f.states[1:] {
		if st.Full {
			t.Errorf("a watched state (revision %d) says Full", st.Revision)
		}
		for _, k := range st.NodesChanged {
			changed[k] = true
		}
	}
	f.mu.Unlock()
	for _, k := range []string{ek("a"), ek("e"), ek("b")} {
		if !changed[k] {
			t.Errorf("no watched state named %s in NodesChanged: %v", k[:1], changed)
		}
	}
	delete(changed, ek("c"))
	if len(changed) != 3 {
		t.Errorf("NodesChanged named %d records, want a, b, e: %v", len(changed), changed)
	}
	got := final.Replicas["r2"]
	if !got.Forgotten || got.Updated.Equal(t0) {
		t.Errorf("r2 after Forget = %+v, want Forgotten with a new Updated", got)
	}
	rep2.Forgotten, rep2.Updated = true, got.Updated
	wantFinal := State{
		Policy:   &applied,
		Replicas: map[string]ReplicaRecord{"r1": rep, "r2": rep2},
		Alive:    map[string]AliveRecord{"r1": alive},
		Revoked:  map[string]Revocation{ek("e"): rev2},
		Nodes:    map[string]NodeRecord{ek("b"): node},
	}
	if diff := cmp.Diff(wantFinal, final, stateCmp); diff != "" {
		t.Errorf("state after the watch (-want +got):\n%s", diff)
	}
	if final.Revision <= snap.Revision {
		t.Errorf("revision %d after the watch, not past the snapshot's %d", final.Revision, snap.Revision)
	}
	// Copy on write: the snapshot handed out first is as it was.
	if diff := cmp.Diff(wantSnap, f.first(), stateCmp); diff != "" {
		t.Errorf("the first State changed after it was handed out (-want +got):\n%s", diff)
	}
	log := a.log.String()
	for k := range bad {
		if n := strings.Count(log, "key="+k+" "); n != 1 {
			t.Errorf("warnings for %s: %d, want 1 (rate-limited):\n%s", k, n, log)
		}
	}
	if h := a.Health(); !h.OK || h.Revision < final.Revision {
		t.Errorf("Health = %+v, want OK at revision >= %d", h, final.Revision)
	}
}

// TestTwoStores: two replicas' stores see each other's writes.
func TestTwoStores(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	a, b := open(t, c.Endpoints(), "/lanyard/two"), open(t, c.Endpoints(), "/lanyard/two")
	fa, fb := follow(t, a.Store), follow(t, b.Store)
	if err := a.Revoke(ctx(t), ek("1"), Revocation{Reason: "r"}); err != nil {
		t.Fatal(err)
	}
	fb.waitFor(t, "b to see a's revocation", func(st State) bool { _, ok := st.Revoked[ek("1")]; return ok })
	if err := b.PutNode(ctx(t), NodeRecord{EKSHA256: ek("2"), Replica: "b"}); err != nil {
		t.Fatal(err)
	}
	fa.waitFor(t, "a to see b's node", func(st State) bool { return st.Nodes[ek("2")].Replica == "b" })
	// A different prefix is a different tier.
	other := open(t, c.Endpoints(), "/lanyard/two-other")
	fo := follow(t, other.Store)
	if st := fo.waitFor(t, "the other tier's snapshot", func(State) bool { return true }); len(st.Revoked)+len(st.Nodes) != 0 {
		t.Errorf("prefix /lanyard/two-other sees records of /lanyard/two: %+v", st)
	}
}

// TestPolicyRevisions: ApplyPolicy counts 1, 2, 3; concurrent applies
// from two stores both succeed with distinct revisions; SeedPolicy writes
// only once; an oversized policy is refused and changes nothing.
func TestPolicyRevisions(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	a, b := open(t, c.Endpoints(), "/lanyard/pol"), open(t, c.Endpoints(), "/lanyard/pol")
	for want := int64(1); want <= 3; want++ {
		if got, err := a.ApplyPolicy(ctx(t), policyRec("# rev")); got != want || err != nil {
			t.Fatalf("ApplyPolicy = %d, %v; want %d", got, err, want)
		}
	}
	if ok, err := a.SeedPolicy(ctx(t), policyRec("# seed")); ok || err != nil {
		t.Errorf("SeedPolicy over an existing policy = %v, %v; want false, nil", ok, err)
	}

	const each = 4
	var (
		mu   sync.Mutex
		revs = map[int64]bool{}
		wg   sync.WaitGroup
	)
	for _, s := range []testStore{a, b} {
		wg.Go(func() {
			for range each {
				r, err := s.ApplyPolicy(ctx(t), policyRec("# concurrent"))
				if err != nil {
					t.Errorf("concurrent ApplyPolicy: %v", err)
					return
				}
				mu.Lock()
				revs[r] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for r := int64(4); r < 4+2*each; r++ {
		if !revs[r] {
			t.Errorf("revisions written concurrently = %v, want each of 4..%d once", revs, 3+2*each)
		}
	}

	big := policyRec(strings.Repeat("#", MaxPolicySize))
	if _, err := a.ApplyPolicy(ctx(t), big); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "over the limit of 1048576") {
		t.Errorf("ApplyPolicy of a 1 MiB policy: %v, want ErrInvalid naming the limit", err)
	}
	f := follow(t, a.Store)
	if st := f.waitFor(t, "the policy", func(st State) bool { return st.Policy != nil }); st.Policy.Revision != 3+2*each || st.Policy.Source != "# concurrent" {
		t.Errorf("policy in force: revision %d %q, want %d, unchanged by the refused apply", st.Policy.Revision, st.Policy.Source, 3+2*each)
	}

	fresh := open(t, c.Endpoints(), "/lanyard/pol-seed")
	for i, want := range []bool{true, false} {
		if ok, err := fresh.SeedPolicy(ctx(t), policyRec("# seed")); ok != want || err != nil {
			t.Errorf("SeedPolicy #%d = %v, %v; want %v", i+1, ok, err, want)
		}
	}
	if got, err := fresh.ApplyPolicy(ctx(t), policyRec("# next")); got != 2 || err != nil {
		t.Errorf("ApplyPolicy after a seed = %d, %v; want 2", got, err)
	}
}

// TestWriteErrors: every write refuses what it must, precisely, and bad
// input never reaches etcd.
func TestWriteErrors(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	a := open(t, c.Endpoints(), "/lanyard/err")
	if err := a.Revoke(ctx(t), ek("1"), Revocation{Reason: "first"}); err != nil {
		t.Fatal(err)
	}
	if err := a.PublishReplica(ctx(t), ReplicaRecord{Name: "gone"}); err != nil {
		t.Fatal(err)
	}
	if err := a.Register(t.Context(), AliveRecord{Name: "live"}); err != nil {
		t.Fatal(err)
	}
	if err := a.PublishReplica(ctx(t), ReplicaRecord{Name: "live"}); err != nil {
		t.Fatal(err)
	}
	before := a.Writes()
	tests := []struct {
		name string
		op   func() error
		want error
		text string
	}{
		{"revoke twice", func() error { return a.Revoke(ctx(t), ek("1"), Revocation{Reason: "second"}) }, ErrExists, "revoke " + ek("1") + ": already present"},
		{"unrevoke absent", func() error { _, err := a.Unrevoke(ctx(t), ek("2")); return err }, ErrNotFound, "unrevoke " + ek("2") + ": not found"},
		{"forget unknown", func() error { return a.Forget(ctx(t), "nobody") }, ErrNotFound, "forget replica nobody: not found"},
		{"forget alive", func() error { return a.Forget(ctx(t), "live") }, ErrAlive, "forget replica live: replica is alive"},
		{"delete changed replica", func() error { return a.DeleteReplica(ctx(t), "gone", 1) }, ErrConflict, "delete replica gone: changed since revision 1"},
		{"revoke malformed EK", func() error { return a.Revoke(ctx(t), "ABC", Revocation{}) }, ErrInvalid, `EK SHA-256 "ABC": want 64 lowercase hex digits`},
		{"node with a path in its EK", func() error { return a.PutNode(ctx(t), NodeRecord{EKSHA256: "../" + ek("1")[3:]}) }, ErrInvalid, "want 64 lowercase hex digits"},
		{"replica name with a slash", func() error { return a.PublishReplica(ctx(t), ReplicaRecord{Name: "a/b"}) }, ErrInvalid, `replica name "a/b"`},
		{"register empty name", func() error { return a.Register(t.Context(), AliveRecord{}) }, ErrInvalid, `replica name ""`},
		{"oversized node", func() error {
			return a.PutNode(ctx(t), NodeRecord{EKSHA256: ek("3"), Nodes: []string{strings.Repeat("n", MaxRecordSize)}})
		}, ErrInvalid, "over the limit of 262144"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.op()
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.text) {
				t.Errorf("error = %v, want %v containing %q", err, tt.want, tt.text)
			}
		})
	}
	if got := a.Writes(); got != before {
		t.Errorf("refused writes counted: Writes went from %d to %d", before, got)
	}
	r, err := a.Unrevoke(ctx(t), ek("1"))
	if err != nil || r.Reason != "first" {
		t.Errorf("Unrevoke = %+v, %v; want the first revocation", r, err)
	}
	if _, err := Open(Config{Endpoints: c.Endpoints(), Prefix: "/lanyard/"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Open with a trailing slash: %v, want ErrInvalid", err)
	}
	if _, err := Open(Config{Prefix: "/lanyard"}); err == nil {
		t.Errorf("Open without endpoints succeeded")
	}
}

// TestRegister: one live holder per name; Close frees the name at once,
// a client that dies without revoking frees it when the lease expires;
// Forget and DeleteReplica then clean up.
func TestRegister(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	a, b := open(t, c.Endpoints(), "/lanyard/reg"), open(t, c.Endpoints(), "/lanyard/reg")
	watcher := open(t, c.Endpoints(), "/lanyard/reg")
	f := follow(t, watcher.Store)

	if err := a.Register(t.Context(), AliveRecord{Name: "r1", Address: "a:1"}); err != nil {
		t.Fatalf("Register a: %v", err)
	}
	err := b.Register(t.Context(), AliveRecord{Name: "r1", Address: "b:1"})
	if !errors.Is(err, ErrAlive) || !strings.Contains(err.Error(), `"a:1"`) {
		t.Fatalf("Register of a held name: %v, want ErrAlive naming the holder", err)
	}
	f.waitFor(t, "r1 alive at a", func(st State) bool { return st.Alive["r1"].Address == "a:1" })
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// No wait: Close revoked the lease.
	if err := b.Register(t.Context(), AliveRecord{Name: "r1", Address: "b:1"}); err != nil {
		t.Fatalf("Register after the holder's Close: %v", err)
	}
	f.waitFor(t, "r1 alive at b", func(st State) bool { return st.Alive["r1"].Address == "b:1" })

	// b's client dies without revoking: the lease expires (LeaseTTL 2s).
	if err := b.PublishReplica(ctx(t), ReplicaRecord{Name: "r1", Address: "b:1"}); err != nil {
		t.Fatal(err)
	}
	b.cli.Close()
	st := f.waitFor(t, "r1's lease to expire", func(st State) bool { _, ok := st.Alive["r1"]; return !ok })
	stale := st.Replicas["r1"].ModRevision
	if err := watcher.Forget(ctx(t), "r1"); err != nil {
		t.Fatalf("Forget of a dead replica: %v", err)
	}
	st = f.waitFor(t, "r1 forgotten", func(st State) bool { return st.Replicas["r1"].Forgotten })
	if err := watcher.DeleteReplica(ctx(t), "r1", stale); !errors.Is(err, ErrConflict) {
		t.Errorf("DeleteReplica with the revision before Forget: %v, want ErrConflict", err)
	}
	if err := watcher.DeleteReplica(ctx(t), "r1", st.Replicas["r1"].ModRevision); err != nil {
		t.Fatalf("DeleteReplica: %v", err)
	}
	f.waitFor(t, "r1 deleted", func(st State) bool { _, ok := st.Replicas["r1"]; return !ok })
	if err := watcher.Register(t.Context(), AliveRecord{Name: "r1"}); err != nil {
		t.Errorf("Register after expiry: %v", err)
	}
	if w := watcher.Writes(); w == 0 {
		t.Errorf("Writes() = 0 after grants, puts and deletes")
	}
}

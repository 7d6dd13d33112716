package store

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/etcdtest"
	"github.com/lanyard-dev/lanyard/internal/testwait"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// retry polls a write until etcd takes it (an election may be under way).
func retry(t *testing.T, what string, op func() error) {
	t.Helper()
	var err error
	testwait.For(t, wait, what, func() bool {
		err = op()
		return err == nil
	})
}

// killAll kills every member at once: each Kill waits for the member's
// open streams to be cut, seconds each.
func killAll(c *etcdtest.Cluster, n int) {
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { c.Kill(i) })
	}
	wg.Wait()
}

// restartAll starts every member again at once: a lone member cannot
// become ready without a quorum.
func restartAll(t *testing.T, c *etcdtest.Cluster, n int) {
	t.Helper()
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { c.Restart(i) })
	}
	wg.Wait()
}

// TestLeaderKilled: Run keeps delivering, and the replica stays alive,
// across an election.
func TestLeaderKilled(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	a, b := open(t, c.Endpoints(), "/lanyard/leader"), open(t, c.Endpoints(), "/lanyard/leader")
	fa := follow(t, a.Store)
	if err := a.Register(t.Context(), AliveRecord{Name: "ra"}); err != nil {
		t.Fatal(err)
	}
	fa.waitFor(t, "ra alive", func(st State) bool { _, ok := st.Alive["ra"]; return ok })

	c.Kill(c.WaitLeader())
	retry(t, "a write after the election", func() error { return b.PutNode(ctx(t), NodeRecord{EKSHA256: ek("1")}) })
	fa.waitFor(t, "the write made after the election", func(st State) bool { _, ok := st.Nodes[ek("1")]; return ok })
	testwait.For(t, wait, "a's health OK", func() bool { return a.Health().OK })
	if _, ok := fa.last().Alive["ra"]; !ok {
		t.Errorf("ra not alive after the election")
	}
}

// TestCutOffAndQuorumLoss: a store whose only member dies reports it
// within seconds and refuses writes with ErrUnavailable; when the member
// is back, its watch catches up on what another store wrote meanwhile,
// without restarting Run. The same for the whole cluster.
func TestCutOffAndQuorumLoss(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	eps := c.Endpoints()
	a, b := open(t, eps[:1], "/lanyard/cut"), open(t, eps[1:], "/lanyard/cut")
	fa, fb := follow(t, a.Store), follow(t, b.Store)
	if err := a.Register(t.Context(), AliveRecord{Name: "ra"}); err != nil {
		t.Fatal(err)
	}
	fb.waitFor(t, "ra alive", func(st State) bool { _, ok := st.Alive["ra"]; return ok })
	testwait.For(t, wait, "a's health OK", func() bool { return a.Health().OK })

	// Member 0, a's only endpoint, dies.
	c.Kill(0)
	testwait.For(t, wait, "a's health to report the loss", func() bool { return !a.Health().OK })
	h := a.Health()
	if h.LastError == "" || h.Since.IsZero() {
		t.Errorf("Health while cut off = %+v, want the error and since when", h)
	}
	err := a.Revoke(ctx(t), ek("a"), Revocation{Reason: "r"})
	if !errors.Is(err, ErrUnavailable) || !strings.HasPrefix(err.Error(), "revoke "+ek("a")+": etcd unavailable: ") {
		t.Errorf("Revoke while cut off: %v, want ErrUnavailable", err)
	}
	retry(t, "b's write while a is cut off", func() error { return b.Revoke(ctx(t), ek("b"), Revocation{Reason: "meanwhile"}) })
	c.Restart(0)
	fa.waitFor(t, "a to catch up on b's write", func(st State) bool { return st.Revoked[ek("b")].Reason == "meanwhile" })
	testwait.For(t, wait, "a's health OK again", func() bool { return a.Health().OK })
	fb.waitFor(t, "ra alive after the outage", func(st State) bool { _, ok := st.Alive["ra"]; return ok })

	// Every member dies.
	killAll(c, len(eps))
	testwait.For(t, wait, "both stores to report the loss", func() bool { return !a.Health().OK && !b.Health().OK })
	if err := b.PutNode(ctx(t), NodeRecord{EKSHA256: ek("c")}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("PutNode without a quorum: %v, want ErrUnavailable", err)
	}
	if _, err := b.ApplyPolicy(ctx(t), policyRec("# p")); !errors.Is(err, ErrUnavailable) {
		t.Errorf("ApplyPolicy without a quorum: %v, want ErrUnavailable", err)
	}
	restartAll(t, c, len(eps))
	retry(t, "a write after the restart", func() error { return b.PutNode(ctx(t), NodeRecord{EKSHA256: ek("d")}) })
	fa.waitFor(t, "a to see the write", func(st State) bool { _, ok := st.Nodes[ek("d")]; return ok })
	testwait.For(t, wait, "both healthy again", func() bool { return a.Health().OK && b.Health().OK })
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("a's log:\n%s", a.log.String())
		}
	})
	fb.waitFor(t, "ra alive after the restart", func(st State) bool { _, ok := st.Alive["ra"]; return ok })
	if !strings.Contains(a.log.String(), "replica lease lost") {
		t.Errorf("a's lease keepalive never noticed the outage:\n%s", a.log.String())
	}
}

// TestCompactedWhileDown: when the revision a store's watch must resume
// from was compacted during its outage, it loads everything again, and
// deletions made meanwhile are gone from its state too.
func TestCompactedWhileDown(t *testing.T) {
	t.Parallel()
	c := cluster(t)
	eps := c.Endpoints()
	a, b := open(t, eps[:1], "/lanyard/compact"), open(t, eps[1:], "/lanyard/compact")
	fa := follow(t, a.Store)
	if err := b.Revoke(ctx(t), ek("aa"), Revocation{Reason: "old"}); err != nil {
		t.Fatal(err)
	}
	fa.waitFor(t, "the first revocation", func(st State) bool { _, ok := st.Revoked[ek("aa")]; return ok })

	c.Kill(0)
	retry(t, "unrevoke while a is down", func() error { _, err := b.Unrevoke(ctx(t), ek("aa")); return err })
	if err := b.Revoke(ctx(t), ek("bb"), Revocation{Reason: "new"}); err != nil {
		t.Fatal(err)
	}
	var resp *clientv3.PutResponse
	retry(t, "a filler write", func() (err error) {
		resp, err = b.cli.Put(ctx(t), "/elsewhere", "x")
		return err
	})
	if _, err := b.cli.Compact(ctx(t), resp.Header.Revision); err != nil {
		t.Fatalf("compact: %v", err)
	}
	c.Restart(0)
	fa.waitFor(t, "a to converge after the reload", func(st State) bool {
		_, old := st.Revoked[ek("aa")]
		_, ok := st.Revoked[ek("bb")]
		return ok && !old
	})
	if !strings.Contains(a.log.String(), "watch revision compacted") {
		t.Errorf("no reload logged:\n%s", a.log.String())
	}
}

package etcdtest

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestClusterSurvivesLeaderLoss writes through a three-member cluster,
// kills its leader, sees a new one elected and the data still there, and
// brings the old leader back.
func TestClusterSurvivesLeaderLoss(t *testing.T) {
	c := Start(t, 3)
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	put := func(k, v string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := cli.Put(ctx, k, v)
		return err
	}
	if err := put("/k", "1"); err != nil {
		t.Fatalf("put: %v", err)
	}
	old := c.WaitLeader()
	c.Kill(old)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if i := c.Leader(); i >= 0 {
			if i == old {
				t.Fatalf("killed member %d still leader", old)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no new leader after killing the old one")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var lastErr error
	for time.Now().Before(deadline) {
		if lastErr = put("/k", "2"); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("put after the election: %v", lastErr)
	}
	c.Restart(old)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// A serializable read from the restarted member alone shows it caught up.
	one, err := clientv3.New(clientv3.Config{Endpoints: []string{c.Endpoint(old)}, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	for {
		r, err := one.Get(ctx, "/k", clientv3.WithSerializable())
		if err == nil && len(r.Kvs) == 1 && string(r.Kvs[0].Value) == "2" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("restarted member never caught up: %v %v", r, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

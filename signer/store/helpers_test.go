package store

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/etcdtest"
	"github.com/lanyard-dev/lanyard/internal/leakcheck"
	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/lanyard-dev/lanyard/internal/testwait"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// wait is the deadline of every poll here: generous next to the second a
// change takes on a loaded CI machine, so it bounds a hang, not speed.
const wait = 10 * time.Second

// ek is a valid EK SHA-256 key made from a short tag.
func ek(tag string) string { return tag + strings.Repeat("0", 64-len(tag)) }

// testStore is a Store and its log.
type testStore struct {
	*Store
	log *testlog.Buffer
}

// open opens a Store on endpoints under prefix, closed at cleanup.
func open(t *testing.T, endpoints []string, prefix string) testStore {
	t.Helper()
	var buf testlog.Buffer
	s, err := Open(Config{
		Endpoints: endpoints,
		Prefix:    prefix,
		OpTimeout: time.Second,
		LeaseTTL:  2 * time.Second,
		Log:       hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Debug}),
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return testStore{s, &buf}
}

// follower runs a Store's Run and keeps every State it hands out.
type follower struct {
	mu     sync.Mutex
	states []State
}

// follow runs s.Run until the test ends, and checks that Run returns nil
// once its context is canceled.
func follow(t *testing.T, s *Store) *follower {
	t.Helper()
	f := &follower{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- s.Run(ctx, func(st State) {
			f.mu.Lock()
			f.states = append(f.states, st)
			f.mu.Unlock()
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v after cancel, want nil", err)
			}
		case <-time.After(wait):
			t.Errorf("Run did not return within %v of cancel", wait)
		}
	})
	return f
}

// last is the newest State handed out (zero before the first).
func (f *follower) last() State {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.states) == 0 {
		return State{}
	}
	return f.states[len(f.states)-1]
}

// waitFor polls until the newest State satisfies cond, and returns it.
func (f *follower) waitFor(t *testing.T, what string, cond func(State) bool) State {
	t.Helper()
	var st State
	testwait.For(t, wait, what, func() bool {
		st = f.last()
		return f.count() > 0 && cond(st)
	})
	return st
}

// first is the first State handed out (zero before it).
func (f *follower) first() State {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.states) == 0 {
		return State{}
	}
	return f.states[0]
}

func (f *follower) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.states)
}

// cluster starts a three-member cluster.
func cluster(t *testing.T) *etcdtest.Cluster {
	t.Helper()
	return etcdtest.Start(t, 3)
}

// ctx is a test's context for one store operation.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return c
}

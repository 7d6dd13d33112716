//go:build cgo

package agent

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/rotator"
)

// simLine is one connection to the simulator that the test can cut, as
// killing swtpm cuts the agent's socket. Closing it leaves the simulator
// running for the next connection.
type simLine struct {
	sim *simulator.Simulator
	cut atomic.Bool
}

func (l *simLine) Read(p []byte) (int, error) {
	if l.cut.Load() {
		return 0, io.EOF
	}
	return l.sim.Read(p)
}

func (l *simLine) Write(p []byte) (int, error) {
	if l.cut.Load() {
		return 0, errors.New("broken pipe")
	}
	return l.sim.Write(p)
}

func (l *simLine) Close() error { return nil }

// TestTPMLinkReopens: a TPM whose command stream breaks is found out (by
// the probe, or at once by a failed operation), reported unreachable with
// the reopen error while reopening fails, and reopened once it can be;
// the agent is told so that it attests on the new TPM.
func TestTPMLinkReopens(t *testing.T) {
	tests := []struct {
		name  string
		probe time.Duration
		byOp  bool // a failed operation reports the loss (the probe would take an hour)
	}{
		{"found by the probe", 20 * time.Millisecond, false},
		{"found by a failed operation", time.Hour, true},
	}
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("start simulator: %v", err)
	}
	t.Cleanup(func() { sim.Close() })
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var line atomic.Pointer[simLine]
			var down atomic.Bool
			open := func() (*node.TPM, error) {
				if down.Load() {
					return nil, errors.New("dial TPM socket: connection refused")
				}
				l := &simLine{sim: sim}
				line.Store(l)
				return node.OpenTPMChannel(l)
			}
			first, err := open()
			if err != nil {
				t.Fatal(err)
			}
			var reopened atomic.Int32
			link := newTPMLink(first, open, nil)
			link.probe = tt.probe
			link.backoff = rotator.Backoff{Base: 10 * time.Millisecond, Max: 40 * time.Millisecond}
			link.reopened = func() { reopened.Add(1) }
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- link.Run(ctx) }()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			}()

			down.Store(true)
			line.Load().cut.Store(true) // swtpm is killed
			if tt.byOp {
				if _, err := first.NewSession(); err == nil {
					t.Fatal("NewSession on a cut line succeeded")
				}
				link.check(first)
			}
			pollLink(t, "the TPM reported unreachable after 2 failed reopens", func() bool {
				st := link.Snapshot()
				return !st.Reachable && st.ReopenFailures >= 2
			})
			st := link.Snapshot()
			if st.Error != "dial TPM socket: connection refused" || st.LostAt.IsZero() {
				t.Errorf("state while down = %+v, want the reopen error and when it was lost", st)
			}
			if _, err := link.current(); !errors.Is(err, node.ErrTPMUnreachable) {
				t.Errorf("current() while down: %v, want ErrTPMUnreachable", err)
			}
			if reopened.Load() != 0 {
				t.Error("reopened called while the TPM is down")
			}

			down.Store(false) // swtpm is back
			pollLink(t, "the TPM reopened", func() bool { return link.Snapshot().Reachable })
			tpm, err := link.current()
			if err != nil || tpm == first {
				t.Fatalf("current() after reopen = %p, %v; want a new TPM", tpm, err)
			}
			sess, err := tpm.NewSession()
			if err != nil {
				t.Fatalf("NewSession on the reopened TPM: %v", err)
			}
			sess.Close()
			pollLink(t, "the agent told of the reopen", func() bool { return reopened.Load() == 1 })
		})
	}
}

// pollLink waits up to 10 s for cond.
func pollLink(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

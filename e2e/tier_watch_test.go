package e2e

import (
	"context"
	"crypto/x509"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// x509Update is one response of a workload's FetchX509SVID stream and
// when it arrived.
type x509Update struct {
	at time.Time
	x  *workloadapi.X509Context
}

// x509Recorder is a workload streaming X.509-SVIDs with go-spiffe's
// client: it records every update and every stream error the client
// reports. Unlike the sampling watcher (rotation_test.go), it can prove
// there was no gap: each SVID held is checked to be valid up to the
// instant the next one arrived.
type x509Recorder struct {
	mu      sync.Mutex
	updates []x509Update
	errs    []string
	stopped bool
	cancel  context.CancelFunc
	done    chan struct{}
}

// recordX509 opens the stream on socket and records until the test ends
// (or stop).
func recordX509(t *testing.T, socket string) *x509Recorder {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	r := &x509Recorder{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		client.WatchX509Context(ctx, r)
	}()
	t.Cleanup(func() {
		r.stop()
		client.Close()
	})
	waitFor(t, 10*time.Second, "the workload's first X.509-SVID", func() bool { return len(r.snapshot()) > 0 })
	return r
}

// OnX509ContextUpdate implements workloadapi.X509ContextWatcher.
func (r *x509Recorder) OnX509ContextUpdate(x *workloadapi.X509Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.stopped {
		r.updates = append(r.updates, x509Update{at: time.Now(), x: x})
	}
}

// OnX509ContextWatchError implements workloadapi.X509ContextWatcher: every
// error the stream saw, which the client then retried.
func (r *x509Recorder) OnX509ContextWatchError(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.stopped {
		r.errs = append(r.errs, fmt.Sprintf("%s: %v", time.Now().Format(time.StampMilli), err))
	}
}

// stop ends recording (the errors of closing the stream are not the
// workload's) and waits for the stream to end.
func (r *x509Recorder) stop() {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.cancel()
	<-r.done
}

func (r *x509Recorder) snapshot() []x509Update {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]x509Update(nil), r.updates...)
}

// latest is the newest update.
func (r *x509Recorder) latest() x509Update {
	u := r.snapshot()
	return u[len(u)-1]
}

// waitSVID waits for an update whose default SVID satisfies ok and
// returns it.
func (r *x509Recorder) waitSVID(t *testing.T, d time.Duration, what string, ok func(leaf *x509.Certificate) bool) x509Update {
	t.Helper()
	var got x509Update
	waitFor(t, d, what, func() bool {
		for _, u := range r.snapshot() {
			if s := u.x.DefaultSVID(); s != nil && ok(s.Certificates[0]) {
				got = u
				return true
			}
		}
		return false
	})
	return got
}

// renewedAfter waits for an SVID signed after t0 and returns its update:
// a serial the workload did not hold before t0, whose lifetime (ttl)
// started after t0. The signer backdates NotBefore (clock skew), so the
// instant of signing is NotAfter - ttl, to the second (hence the slack).
func (r *x509Recorder) renewedAfter(t *testing.T, d time.Duration, what string, t0 time.Time, ttl time.Duration) x509Update {
	t.Helper()
	held := map[string]bool{}
	for _, u := range r.snapshot() {
		if u.at.Before(t0) {
			for _, s := range u.x.SVIDs {
				held[s.Certificates[0].SerialNumber.Text(16)] = true
			}
		}
	}
	return r.waitSVID(t, d, what, func(leaf *x509.Certificate) bool {
		return !held[leaf.SerialNumber.Text(16)] && leaf.NotAfter.Add(-ttl).After(t0.Add(-time.Second))
	})
}

// renewalsSince counts the default SVIDs first held after t0.
func (r *x509Recorder) renewalsSince(t0 time.Time) int {
	seen := map[string]bool{}
	n := 0
	for _, u := range r.snapshot() {
		s := u.x.DefaultSVID()
		if s == nil {
			continue
		}
		serial := s.Certificates[0].SerialNumber.Text(16)
		if !seen[serial] && !u.at.Before(t0) {
			n++
		}
		seen[serial] = true
	}
	return n
}

// checkNoGap stops the recorder and asserts what a workload must never
// see across the test: a stream error, or an instant without a valid
// SVID. Each update's default SVID must verify against the bundle that
// came with it, and stay valid until the next update arrived (the last
// one until now).
func (r *x509Recorder) checkNoGap(t *testing.T) []x509Update {
	t.Helper()
	r.stop()
	end := time.Now()
	r.mu.Lock()
	updates, errs := r.updates, r.errs
	r.mu.Unlock()
	if len(errs) > 0 {
		t.Errorf("the workload's stream saw %d errors, first: %s", len(errs), errs[0])
	}
	for i, u := range updates {
		s := u.x.DefaultSVID()
		if s == nil {
			t.Errorf("update %d at %s: no SVID", i, u.at.Format(time.StampMilli))
			continue
		}
		leaf := s.Certificates[0]
		if _, _, err := x509svid.Verify(s.Certificates, u.x.Bundles, x509svid.WithTime(u.at)); err != nil {
			t.Errorf("update %d at %s: SVID %x does not verify against its bundle: %v",
				i, u.at.Format(time.StampMilli), leaf.SerialNumber, err)
		}
		until := end
		if i+1 < len(updates) {
			until = updates[i+1].at
		}
		if !until.Before(leaf.NotAfter) {
			t.Errorf("gap: SVID %x (update %d) expired at %s, the next one came at %s",
				leaf.SerialNumber, i, leaf.NotAfter.Format(time.StampMilli), until.Format(time.StampMilli))
		}
	}
	return updates
}

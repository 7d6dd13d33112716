package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	errNoAnswer = errors.New("no answer from etcd yet")
	errLoading  = errors.New("loading the shared state")
	errStopped  = errors.New("not following etcd (Run ended)")
)

// Health reports the link to etcd: not OK while reads, the watch or the
// lease keepalive fail, with the error and since when.
func (s *Store) Health() Health {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.health
}

// do runs one etcd operation under OpTimeout and turns a failure to reach
// etcd into ErrUnavailable, so every caller can refuse with the same
// "etcd unavailable: ..." whatever the cause.
func (s *Store) do(ctx context.Context, step string, op func(context.Context) error) error {
	octx, cancel := context.WithTimeout(ctx, s.cfg.OpTimeout)
	defer cancel()
	err := op(octx)
	if err == nil {
		s.setLink(nil)
		return nil
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("%s: %w", step, ctx.Err())
	}
	if unavailable(err) {
		s.setLink(err)
		return fmt.Errorf("%s: %w: %w", step, ErrUnavailable, err)
	}
	return fmt.Errorf("%s: %w", step, err)
}

// unavailable reports whether err means etcd could not be reached or had
// no quorum (as opposed to a refusal of the request itself).
func unavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	code := codes.Unknown
	if ee, ok := errors.AsType[rpctypes.EtcdError](err); ok {
		code = ee.Code()
	} else if st, ok := status.FromError(err); ok {
		code = st.Code()
	}
	// Canceled without our context being canceled is the client shutting
	// its connection.
	return code == codes.Unavailable || code == codes.DeadlineExceeded || code == codes.Canceled
}

// setLink records the outcome of the latest read, write, probe or
// keepalive.
func (s *Store) setLink(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.linkErr = err
	s.updateHealth()
}

// setWatch records whether Run's watch works (nil) or not.
func (s *Store) setWatch(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.watchErr = err
	s.updateHealth()
}

// seen records the newest etcd revision this store has read.
func (s *Store) seen(rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rev > s.health.Revision {
		s.health.Revision = rev
	}
}

func (s *Store) updateHealth() {
	err := s.watchErr
	if s.linkErr != nil {
		err = s.linkErr
	}
	ok := err == nil
	if ok != s.health.OK {
		s.health.OK, s.health.Since = ok, time.Now()
		if ok {
			s.log.Info("etcd reachable")
		} else {
			s.log.Warn("etcd unavailable", "error", err)
		}
	}
	s.health.LastError = ""
	if err != nil {
		s.health.LastError = err.Error()
		if errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded {
			// The client retries a refused connection or TLS handshake
			// until the deadline and reports only that: say where to look.
			s.health.LastError += " (no etcd endpoint answered in time: check the endpoints, the etcd tls block, and etcd's own log)"
		}
	}
}

// warnInterval and maxWarned rate-limit the warning about a record that
// does not decode: once per key per interval, and a bounded memory of keys.
const (
	warnInterval = time.Minute
	maxWarned    = 256
)

// warnRecord logs, rate-limited per key, that a record was skipped.
func (s *Store) warnRecord(key string, err error) {
	s.mu.Lock()
	now := time.Now()
	last, seen := s.warned[key]
	if seen && now.Sub(last) < warnInterval {
		s.mu.Unlock()
		return
	}
	if len(s.warned) >= maxWarned {
		clear(s.warned)
	}
	s.warned[key] = now
	s.mu.Unlock()
	s.log.Warn("skipping a record that does not decode", "key", key, "error", err)
}

// backoff is the wait between attempts to reach etcd again: 250 ms,
// doubling to 2 s, back to the start after a success.
type backoff struct{ next time.Duration }

const (
	backoffMin = 250 * time.Millisecond
	backoffMax = 2 * time.Second
)

// wait sleeps for the next delay, or until ctx ends (false).
func (b *backoff) wait(ctx context.Context) bool {
	if b.next == 0 {
		b.next = backoffMin
	}
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(2*b.next, backoffMax)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (b *backoff) reset() { b.next = 0 }

// Package rotator decides when to renew: SVIDs at half their lifetime with
// jitter, retries after failures with capped exponential backoff. It is
// pure logic: time and randomness come in as values, decisions go out, so
// a table test can name the exact instant. Callers own timers and I/O.
package rotator

import (
	"time"
)

// DefaultJitter is the renewal jitter as a fraction of the half-life: an
// SVID is renewed somewhere in [0.45, 0.55] of its lifetime, so many SVIDs
// issued together do not all come due together.
const DefaultJitter = 0.1

// Schedule decides when an SVID is renewed.
type Schedule struct {
	// Jitter is the spread around the half-life, as a fraction of it
	// (0.1 = ±10 %). Zero means no jitter; values are clamped to [0, 1].
	Jitter float64
}

// RenewAt returns when an SVID valid from notBefore to notAfter should be
// renewed. r in [-1, 1] picks the point in the jitter window (the caller
// draws it once per SVID, so the decision is repeatable); it is clamped.
func (s Schedule) RenewAt(notBefore, notAfter time.Time, r float64) time.Time {
	half := notAfter.Sub(notBefore) / 2
	j := min(max(s.Jitter, 0), 1)
	r = min(max(r, -1), 1)
	return notBefore.Add(half + time.Duration(float64(half)*j*r))
}

// Due reports whether an SVID with these bounds, jittered by r, must be
// renewed at now.
func (s Schedule) Due(now, notBefore, notAfter time.Time, r float64) bool {
	return !now.Before(s.RenewAt(notBefore, notAfter, r))
}

// Backoff spaces out retries after consecutive failures: exponential
// growth from Base, capped at Max, with full jitter so that a fleet that
// lost its signer at the same moment does not come back in lockstep.
type Backoff struct {
	Base, Max time.Duration
}

// DefaultBackoff is used when the agent has no reason to differ.
var DefaultBackoff = Backoff{Base: 250 * time.Millisecond, Max: 30 * time.Second}

// Delay is how long to wait after the given number of consecutive failures
// (1 for the first). r in [0, 1) draws the point in [0, cap]; it is clamped.
// No failures means no wait.
func (b Backoff) Delay(failures int, r float64) time.Duration {
	if failures <= 0 {
		return 0
	}
	ceil := b.Base
	for i := 1; i < failures && ceil < b.Max; i++ {
		ceil *= 2
	}
	ceil = min(ceil, b.Max)
	r = min(max(r, 0), 1)
	// Never zero: a tight retry loop against a down signer helps no one.
	return max(time.Duration(float64(ceil)*r), b.Base/4)
}

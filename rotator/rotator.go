// Package rotator decides when to renew: SVIDs at half their lifetime with
// jitter, retries after failures with capped exponential backoff, and the
// signer's CA: when its successor is published, when it takes over, and
// when an old CA may leave the trust bundle. It is pure logic: time and
// randomness come in as values, decisions go out, so a table test can name
// the exact instant. Callers own timers and I/O.
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

// Backoff spaces out retries after consecutive failures: exponential
// growth from Base, capped at Max, with full jitter so that a fleet that
// lost its signer at the same moment does not come back in lockstep.
type Backoff struct {
	Base, Max time.Duration
	// Floor is the shortest wait ever returned, however the jitter falls
	// and however near a deadline: it caps retries at 1/Floor per
	// second. Zero means Base/4.
	Floor time.Duration
}

// DefaultBackoff is used when the agent has no reason to differ. Its
// floor holds retries to four a second even in an SVID's last moments: a
// signer that is down gains nothing from more, and one that is back is
// still found within a quarter of a second.
var DefaultBackoff = Backoff{Base: 250 * time.Millisecond, Max: 30 * time.Second, Floor: 250 * time.Millisecond}

// floor is the shortest wait b returns.
func (b Backoff) floor() time.Duration {
	if b.Floor > 0 {
		return b.Floor
	}
	return b.Base / 4
}

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
	return max(time.Duration(float64(ceil)*r), b.floor())
}

// DelayBefore is Delay for a retry that must succeed before a deadline
// remaining away, such as renewing an SVID that expires then: the wait is
// capped at a quarter of remaining, so at least a few attempts land before
// the deadline however long the failures have grown the backoff. A signer
// back from an outage is then found within a fraction of the SVID's
// remaining life, not after a full Max. Never below the floor, so the
// retries in the last second stay at a few. With nothing remaining it is
// Delay.
func (b Backoff) DelayBefore(failures int, r float64, remaining time.Duration) time.Duration {
	d := b.Delay(failures, r)
	if remaining <= 0 || d == 0 {
		return d
	}
	limit := max(remaining/4, b.floor())
	if d <= limit {
		return d
	}
	// Still jittered, so a fleet whose SVIDs expire together does not
	// retry in lockstep; never below the floor.
	return max(time.Duration(float64(limit)*min(max(r, 0), 1)), b.floor())
}

// CAActivateAt is when the successor of a CA valid from notBefore to
// notAfter takes over signing: at half the CA's lifetime. An SVID the CA
// signs just before then, with a TTL of at most half the CA TTL (the
// signer's config enforces that), therefore ends before the CA does and is
// never cut short.
func CAActivateAt(notBefore, notAfter time.Time) time.Time {
	return notBefore.Add(notAfter.Sub(notBefore) / 2)
}

// CAPrepareAt is when that successor is created and published in the
// trust bundle, without signing yet: publishLead before CAActivateAt, so
// every relying party holds it before the first SVID it signs appears.
// It is never before notBefore.
func CAPrepareAt(notBefore, notAfter time.Time, publishLead time.Duration) time.Time {
	at := CAActivateAt(notBefore, notAfter).Add(-max(publishLead, 0))
	if at.Before(notBefore) {
		return notBefore
	}
	return at
}

// CAPhase reports, at now, whether the successor of the CA valid from
// notBefore to notAfter should exist and be published (prepare), and
// whether it should have taken over signing (activate). activate implies
// prepare.
func CAPhase(now, notBefore, notAfter time.Time, publishLead time.Duration) (prepare, activate bool) {
	prepare = !now.Before(CAPrepareAt(notBefore, notAfter, publishLead))
	activate = !now.Before(CAActivateAt(notBefore, notAfter))
	return prepare, activate
}

// Droppable reports whether a trust bundle entry kept until keepUntil (the
// latest NotAfter of anything its CA signed) may leave the bundle at now.
// A certificate is still valid at its NotAfter instant, so the entry goes
// only strictly after it.
func Droppable(now, keepUntil time.Time) bool {
	return now.After(keepUntil)
}

// DropAt is the first instant at which Droppable(·, keepUntil) holds: when
// a caller waiting on a timer should look again.
func DropAt(keepUntil time.Time) time.Time {
	return keepUntil.Add(time.Nanosecond)
}

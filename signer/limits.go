package signer

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The limits' refusals. The API server maps them to ResourceExhausted
// (or, for a replaced Sync stream, Aborted); their texts name the limit's
// config field so an operator knows what to raise.
var (
	ErrTooManyAttestations = errors.New("too many attestations in progress (limits.max_pending_attestations)")
	ErrTooManyFromAddress  = errors.New("too many attestations in progress from this address (limits.max_pending_attestations_per_address)")
	ErrMintRate            = errors.New("JWT-SVID mint rate of this agent exceeded (limits.jwt_mints_per_second)")
	ErrSyncReplaced        = errors.New("replaced by a newer Sync stream of this agent (limits.max_sync_streams_per_agent)")
)

// Names of the limits, the limit label of limit_refusals_total.
const (
	limitPending            = "max_pending_attestations"
	limitPendingPerAddress  = "max_pending_attestations_per_address"
	limitFirstMessage       = "attest_first_message_timeout"
	limitSyncStreams        = "max_sync_streams_per_agent"
	limitJWTMintRate        = "jwt_mints_per_second"
	maxTrackedLogSources    = 4096 // sources a logLimiter remembers; beyond, they share one
	maxIdleBucketsUnchecked = 1024 // mint buckets kept before idle ones are swept
)

// attestGate counts Attest streams in flight, in total and per source
// address. Every Attest stream is unauthenticated until it succeeds, so
// these caps are what bounds the memory a network peer can pin.
type attestGate struct {
	max, maxPerAddr int

	mu     sync.Mutex
	total  int
	peak   int            // highest total seen (tests)
	byAddr map[string]int // only addresses with a stream in flight
}

func newAttestGate(l Limits) *attestGate {
	return &attestGate{max: l.MaxPendingAttestations, maxPerAddr: l.MaxPendingAttestationsPerAddress, byAddr: make(map[string]int)}
}

// enter takes a slot for a stream from addr, or says which cap is full.
// A nil error must be paired with leave(addr).
func (g *attestGate) enter(addr string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.byAddr[addr] >= g.maxPerAddr:
		return ErrTooManyFromAddress
	case g.total >= g.max:
		return ErrTooManyAttestations
	}
	g.total++
	g.peak = max(g.peak, g.total)
	g.byAddr[addr]++
	return nil
}

func (g *attestGate) leave(addr string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.total--
	if g.byAddr[addr]--; g.byAddr[addr] <= 0 {
		delete(g.byAddr, addr) // the map holds only addresses in flight
	}
}

// inFlight returns the streams in flight now and the most ever.
func (g *attestGate) inFlight() (now, peak int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.total, g.peak
}

// syncSlots tracks each agent's open Sync streams, oldest first. When a
// new stream goes beyond the cap, the oldest is ended rather than the new
// one refused: after a half-open TCP loss the agent's old stream lingers
// until keepalive notices, and the agent must not be locked out by it.
type syncSlots struct {
	max int

	mu      sync.Mutex
	byAgent map[spiffeid.ID][]*syncSlot
}

type syncSlot struct{ cancel context.CancelCauseFunc }

func newSyncSlots(l Limits) *syncSlots {
	return &syncSlots{max: l.MaxSyncStreamsPerAgent, byAgent: make(map[spiffeid.ID][]*syncSlot)}
}

// open registers a stream of agent whose context cancel ends; it returns
// how many older streams it ended (with cause ErrSyncReplaced) and the
// func to call when the stream ends.
func (s *syncSlots) open(agent spiffeid.ID, cancel context.CancelCauseFunc) (evicted int, release func()) {
	slot := &syncSlot{cancel: cancel}
	s.mu.Lock()
	list := append(s.byAgent[agent], slot)
	for len(list) > s.max {
		list[0].cancel(ErrSyncReplaced)
		list[0] = nil
		list = list[1:]
		evicted++
	}
	s.byAgent[agent] = list
	s.mu.Unlock()
	return evicted, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		list := s.byAgent[agent]
		for i, x := range list {
			if x == slot {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(s.byAgent, agent)
		} else {
			s.byAgent[agent] = list
		}
	}
}

// count returns how many Sync streams agent has open.
func (s *syncSlots) count(agent spiffeid.ID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byAgent[agent])
}

// closeAgent ends every Sync stream of agent with cause, and says how many.
func (s *syncSlots) closeAgent(agent spiffeid.ID, cause error) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.byAgent[agent]
	for _, x := range list {
		x.cancel(cause)
	}
	return len(list)
}

// connected returns how many agents have a Sync stream open.
func (s *syncSlots) connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byAgent)
}

// mintLimiter is a token bucket per agent for JWT-SVID mints. Buckets
// that have refilled are dropped now and then: a full bucket and no
// bucket behave the same, so the map holds only recently busy agents.
type mintLimiter struct {
	rate, burst float64

	mu      sync.Mutex
	buckets map[spiffeid.ID]*bucket
	sweepAt int // sweep idle buckets when the map grows past this
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newMintLimiter(l Limits) *mintLimiter {
	return &mintLimiter{rate: float64(l.JWTMintsPerSecond), burst: float64(l.JWTMintBurst),
		buckets: make(map[spiffeid.ID]*bucket), sweepAt: maxIdleBucketsUnchecked}
}

// take spends n tokens of agent's bucket at now, or none when it holds
// fewer. A call larger than the burst costs the whole burst, so it can
// still pass when the bucket is full.
func (m *mintLimiter) take(agent spiffeid.ID, n int, now time.Time) bool {
	cost := min(float64(n), m.burst)
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.buckets[agent]
	if !ok {
		if len(m.buckets) >= m.sweepAt {
			m.sweepLocked(now)
		}
		b = &bucket{tokens: m.burst, last: now}
		m.buckets[agent] = b
	}
	b.refill(now, m.rate, m.burst)
	if b.tokens < cost {
		return false
	}
	b.tokens -= cost
	return true
}

func (b *bucket) refill(now time.Time, rate, burst float64) {
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = min(burst, b.tokens+dt.Seconds()*rate)
		b.last = now
	}
}

// sweepLocked drops the buckets that are full again, and sets the next
// sweep at twice what is left, so sweeps cost O(1) per new bucket.
func (m *mintLimiter) sweepLocked(now time.Time) {
	for id, b := range m.buckets {
		if b.refill(now, m.rate, m.burst); b.tokens >= m.burst {
			delete(m.buckets, id)
		}
	}
	m.sweepAt = max(maxIdleBucketsUnchecked, 2*len(m.buckets))
}

// logLimiter lets a warning about a source (a peer address or an agent)
// through once per interval, and counts the ones it holds back so the
// next line can say how many there were: a flood of refused calls costs
// one log line per source per interval.
type logLimiter struct {
	interval time.Duration

	mu      sync.Mutex
	sources map[string]*logWindow
}

type logWindow struct {
	start      time.Time
	suppressed int
}

// otherSources is the one source every new source shares once
// maxTrackedLogSources are being tracked.
const otherSources = "other"

func newLogLimiter(interval time.Duration) *logLimiter {
	return &logLimiter{interval: interval, sources: make(map[string]*logWindow)}
}

// allow reports whether a warning about source may be logged at now, and
// how many warnings about it were held back since the last one logged.
func (l *logLimiter) allow(source string, now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	w, found := l.sources[source]
	if !found {
		if len(l.sources) >= maxTrackedLogSources {
			l.pruneLocked(now)
		}
		if len(l.sources) >= maxTrackedLogSources {
			source = otherSources
			w, found = l.sources[source]
		}
	}
	if !found {
		l.sources[source] = &logWindow{start: now}
		return true, 0
	}
	if now.Sub(w.start) < l.interval {
		w.suppressed++
		return false, 0
	}
	suppressed = w.suppressed
	w.start, w.suppressed = now, 0
	return true, suppressed
}

// pruneLocked forgets sources whose window has passed. What they held
// back is then never reported in a line, but it was counted in metrics.
func (l *logLimiter) pruneLocked(now time.Time) {
	for k, w := range l.sources {
		if now.Sub(w.start) >= l.interval {
			delete(l.sources, k)
		}
	}
}

// warnLimited logs a warning about a refused call at most once per
// message and source per refusal_log_interval; the line that gets through
// counts, under "suppressed", those held back since the last.
func (s *Signer) warnLimited(msg, source string, kv ...any) {
	ok, held := s.warnLog.allow(msg+"\x00"+source, time.Now())
	if !ok {
		return
	}
	if held > 0 {
		kv = append(kv, "suppressed", held)
	}
	s.log.Warn(msg, kv...)
}

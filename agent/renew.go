package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// maxBatch bounds one SignX509SVIDs call (the signer refuses more).
	maxBatch = 1000
	// renewBatch and renewSpread pace renewals of still-valid SVIDs when
	// many fall due at once (signer back after an outage, a fleet started
	// together): at most renewBatch per round, rounds spread over a random
	// pause below renewSpread. SVIDs a caller has none of are never paced.
	renewBatch  = 200
	renewSpread = 250 * time.Millisecond
)

// x509Signer is what the renewer needs of the signer: signerConn is the
// real one, the renewer's tests sign in memory.
type x509Signer interface {
	signX509SVIDs(ctx context.Context, req *signerpb.SignX509SVIDsRequest) (*signerpb.SignX509SVIDsResponse, error)
}

// renewer keeps every entry's SVID fresh: it wakes on a sync change or
// when the next SVID falls due, drops expired SVIDs first so they are
// never served, and retries failures with backoff. Ready is closed once
// the entries have arrived and a signing round reached the signer.
type renewer struct {
	cache   *cache
	signer  x509Signer
	sched   rotator.Schedule
	backoff rotator.Backoff
	rand    func() float64 // backoff jitter and pacing in [0, 1)
	jitter  func() float64 // renewal jitter in [-1, 1]
	log     hclog.Logger
	metrics *metrics
	// unknown is called when the signer no longer knows this agent: the
	// upstream attests again, and wakes the renewer when it has.
	unknown func()

	wakec     chan struct{}
	ready     chan struct{}
	readyOnce sync.Once

	mu       sync.Mutex
	failures int // consecutive failed rounds
}

func newRenewer(c *cache, signer x509Signer, log hclog.Logger, m *metrics) *renewer {
	return &renewer{
		cache: c, signer: signer, log: log, metrics: m,
		sched:   rotator.Schedule{Jitter: rotator.DefaultJitter},
		backoff: rotator.DefaultBackoff,
		rand:    randFloat, jitter: randJitter,
		unknown: func() {},
		wakec:   make(chan struct{}, 1),
		ready:   make(chan struct{}),
	}
}

// renewerSnapshot is the renewer's state for the status report.
type renewerSnapshot struct {
	Failures int // consecutive failed renewal rounds
}

// Snapshot returns the renewer's state.
func (r *renewer) Snapshot() renewerSnapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	return renewerSnapshot{Failures: r.failures}
}

// Ready is closed once the entries have arrived and the first signing
// round reached the signer: from then on the cache holds what the signer
// would give (an entry it refused stays refused), and serving makes sense.
func (r *renewer) Ready() <-chan struct{} { return r.ready }

// wake makes the renewer look for work now: the entries changed, or a new
// attestation lets failed renewals go ahead.
func (r *renewer) wake() {
	select {
	case r.wakec <- struct{}{}:
	default:
	}
}

// Run renews until ctx ends.
func (r *renewer) Run(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	failures := 0
	for {
		select {
		case <-r.wakec:
		case <-timer.C:
		case <-ctx.Done():
			return nil
		}
		next, ok := r.round(ctx, &failures)
		if ctx.Err() != nil {
			return nil
		}
		if ok && r.cache.hasSynced() {
			r.readyOnce.Do(func() { close(r.ready) })
		}
		if !next.IsZero() {
			timer.Reset(max(time.Until(next), 0))
		}
	}
}

// round expires what lapsed, signs what is missing or due, and returns
// when to look again and whether the signer answered (or there was
// nothing to ask).
func (r *renewer) round(ctx context.Context, failures *int) (next time.Time, answered bool) {
	now := time.Now()
	if n := r.cache.expire(now); n > 0 {
		r.log.Warn("x509-svids expired before renewal", "count", n)
	}
	missing, renew, next := r.cache.due(now, r.sched)
	paced := len(renew) > renewBatch
	renew = renew[:min(len(renew), renewBatch)]
	work := append(missing, renew...)
	if len(work) == 0 {
		return next, true
	}
	got, answered, err := r.signEntries(ctx, work)
	if stale := r.cache.putSVIDs(got); stale > 0 {
		// The policy changed while they were signed: the sync that
		// changed it woke this loop to sign them again.
		r.log.Info("x509-svids discarded: entry changed while signing", "count", stale)
	}
	r.recordIssued(got)
	if err == nil {
		*failures = 0
		r.setFailures(0)
		// The fresh SVIDs come due later; recompute.
		_, _, next = r.cache.due(time.Now(), r.sched)
		if paced {
			next = time.Now().Add(time.Duration(r.rand() * float64(renewSpread)))
		}
		return next, true
	}
	if ctx.Err() != nil {
		return next, answered
	}
	if status.Code(err) == codes.Unauthenticated {
		r.unknown()
	}
	*failures++
	r.setFailures(*failures)
	// Retry sooner as the first SVID held nears expiry, so a signer that
	// comes back is found while it is still valid.
	var remaining time.Duration
	if earliest, ok := r.cache.earliestNotAfter(); ok {
		remaining = time.Until(earliest)
	}
	retry := time.Now().Add(r.backoff.DelayBefore(*failures, r.rand(), remaining))
	r.log.Error("x509-svid renewal failed", "error", err, "failures", *failures, "retry_at", retry.Format(time.RFC3339Nano))
	if next.IsZero() || retry.Before(next) {
		next = retry
	}
	return next, answered
}

func (r *renewer) setFailures(n int) {
	r.mu.Lock()
	r.failures = n
	r.mu.Unlock()
}

// signEntries generates a key in memory for each entry and has the signer
// sign them, in batches. It returns the SVIDs obtained, whether every
// batch reached the signer and was answered, and the first error; an
// entry the signer refused does not stop the others.
func (r *renewer) signEntries(ctx context.Context, entries []*entry) (out []*svid, answered bool, firstErr error) {
	for len(entries) > 0 {
		batch := entries[:min(len(entries), maxBatch)]
		entries = entries[len(batch):]
		keys := make(map[string]*ecdsa.PrivateKey, len(batch))
		req := &signerpb.SignX509SVIDsRequest{}
		for _, e := range batch {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				r.metrics.svidFailed(failLocal, len(batch)+len(entries))
				return out, false, fmt.Errorf("generate key: %w", err)
			}
			csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
			if err != nil {
				r.metrics.svidFailed(failLocal, len(batch)+len(entries))
				return out, false, fmt.Errorf("create CSR for %s: %w", e.ID, err)
			}
			keys[e.ID] = key
			req.Csrs = append(req.Csrs, &signerpb.CSR{EntryId: e.ID, Csr: csr, Revision: e.Revision})
		}
		resp, err := r.signer.signX509SVIDs(ctx, req)
		if err != nil {
			switch {
			case errors.Is(err, errNotConnected):
				r.metrics.svidFailed(failNotConnected, len(batch)+len(entries))
			case ctx.Err() == nil:
				r.metrics.svidFailed(failSigner, len(batch)+len(entries))
			}
			return out, false, fmt.Errorf("sign %d SVIDs: %w", len(batch), err)
		}
		for _, a := range resp.GetSvids() {
			s, err := r.svidFrom(a, keys, batch)
			if err != nil {
				reason := failBadResponse
				if a.GetError() != "" {
					reason = failRefused
				}
				r.metrics.svidFailed(reason, 1)
				r.log.Warn("x509-svid not obtained", "entry", a.GetEntryId(), "error", err)
				if firstErr == nil {
					firstErr = err
				}
				continue
			}
			out = append(out, s)
		}
	}
	return out, true, firstErr
}

// checkSignedFor makes sure leaf was signed for exactly the revision of e
// the agent asked for: the signer says which revision it signed (a signer
// that predates revisions says 0, and then the SPIFFE ID must at least be
// the entry's). The cache serves an SVID only under the entry revision it
// records, so recording the wrong one would put one entry's identity under
// another revision's selectors.
func checkSignedFor(leaf *x509.Certificate, e *entry, rev uint64) error {
	if rev != 0 && rev != e.Revision {
		return fmt.Errorf("entry %q: signed for revision %x, asked for %x", e.ID, rev, e.Revision)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != e.SPIFFEID.String() {
		return fmt.Errorf("entry %q: SVID is not for %s", e.ID, e.SPIFFEID)
	}
	return nil
}

func (r *renewer) svidFrom(a *signerpb.SignedX509SVID, keys map[string]*ecdsa.PrivateKey, batch []*entry) (*svid, error) {
	if a.GetError() != "" {
		return nil, fmt.Errorf("entry %q refused by signer: %s", a.GetEntryId(), a.GetError())
	}
	key, ok := keys[a.GetEntryId()]
	if !ok || len(a.GetChain()) == 0 {
		return nil, fmt.Errorf("entry %q: unexpected answer from signer", a.GetEntryId())
	}
	var e *entry
	for _, b := range batch {
		if b.ID == a.GetEntryId() {
			e = b
		}
	}
	chain, err := parseCerts("SVID", a.GetChain())
	if err != nil {
		return nil, fmt.Errorf("entry %q: %w", e.ID, err)
	}
	if !publicKeysEqual(chain[0].PublicKey, key.Public()) {
		return nil, fmt.Errorf("entry %q: SVID is not for the key we generated", e.ID)
	}
	if err := checkSignedFor(chain[0], e, a.GetRevision()); err != nil {
		return nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("entry %q: encode key: %w", e.ID, err)
	}
	return &svid{key: e.key(), chain: chain, keyPKCS8: pkcs8, jitter: r.jitter(), received: time.Now()}, nil
}

// recordIssued counts and audits freshly signed SVIDs (README "Audit
// log": entry, spiffe_id, serial, not_after; never the key).
func (r *renewer) recordIssued(got []*svid) {
	r.metrics.svidsIssued.WithLabelValues("x509").Add(float64(len(got)))
	for _, s := range got {
		r.log.Info("x509-svid issued", "entry", s.key.id, "spiffe_id", s.chain[0].URIs[0].String(),
			"serial", s.chain[0].SerialNumber.Text(16), "not_after", s.notAfter().UTC().Format(time.RFC3339))
	}
}

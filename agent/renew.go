package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
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

// due sorts the entries that need a new SVID at now into missing (none
// yet, or signed for an older revision of the entry: urgent, a caller may
// be waiting) and renew (valid but past its renewal point: can wait a
// little). It also returns the earliest instant at which anything else
// falls due or expires.
func (c *cache) due(now time.Time, sched rotator.Schedule) (missing, renew []*signerpb.Entry, next time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		s, ok := c.svids[e.GetId()]
		if !ok || s.revision != e.GetRevision() {
			missing = append(missing, e)
			continue
		}
		at := s.renewAt(sched)
		if !now.Before(at) {
			renew = append(renew, e)
			at = s.notAfter() // still served until then: wake to expire it
		}
		if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	return missing, renew, next
}

// signEntries generates a key in memory for each entry and has the signer
// sign them, in batches. It returns the SVIDs obtained and the first error;
// an entry the signer refused does not stop the others.
func (a *Agent) signEntries(ctx context.Context, entries []*signerpb.Entry) ([]*svid, error) {
	client, _ := a.up.client()
	if client == nil {
		a.metrics.svidFailed(failNotConnected, len(entries))
		return nil, errors.New("not connected to the signer")
	}
	var out []*svid
	var firstErr error
	for len(entries) > 0 {
		batch := entries[:min(len(entries), maxBatch)]
		entries = entries[len(batch):]
		keys := make(map[string]*ecdsa.PrivateKey, len(batch))
		req := &signerpb.SignX509SVIDsRequest{}
		for _, e := range batch {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				a.metrics.svidFailed(failLocal, len(batch)+len(entries))
				return out, fmt.Errorf("generate key: %w", err)
			}
			csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
			if err != nil {
				a.metrics.svidFailed(failLocal, len(batch)+len(entries))
				return out, fmt.Errorf("create CSR for %s: %w", e.GetId(), err)
			}
			keys[e.GetId()] = key
			req.Csrs = append(req.Csrs, &signerpb.CSR{EntryId: e.GetId(), Csr: csr, Revision: e.GetRevision()})
		}
		resp, err := client.SignX509SVIDs(ctx, req)
		if err != nil {
			if ctx.Err() == nil {
				a.metrics.svidFailed(failSigner, len(batch)+len(entries))
			}
			return out, fmt.Errorf("sign %d SVIDs: %w", len(batch), err)
		}
		for _, r := range resp.GetSvids() {
			s, err := a.svidFrom(r, keys, batch)
			if err != nil {
				reason := failBadResponse
				if r.GetError() != "" {
					reason = failRefused
				}
				a.metrics.svidFailed(reason, 1)
				a.log.Warn("x509-svid not obtained", "entry", r.GetEntryId(), "error", err)
				if firstErr == nil {
					firstErr = err
				}
				continue
			}
			out = append(out, s)
		}
	}
	return out, firstErr
}

// checkSignedFor makes sure leaf was signed for exactly the revision of e
// the agent asked for: the signer says which revision it signed (a signer
// that predates revisions says 0, and then the SPIFFE ID must at least be
// the entry's). The cache serves an SVID only under the entry revision it
// records, so recording the wrong one would put one entry's identity under
// another revision's selectors.
func checkSignedFor(leaf *x509.Certificate, e *signerpb.Entry, rev uint64) error {
	if rev != 0 && rev != e.GetRevision() {
		return fmt.Errorf("entry %q: signed for revision %x, asked for %x", e.GetId(), rev, e.GetRevision())
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != e.GetSpiffeId() {
		return fmt.Errorf("entry %q: SVID is not for %s", e.GetId(), e.GetSpiffeId())
	}
	return nil
}

func (a *Agent) svidFrom(r *signerpb.SignedX509SVID, keys map[string]*ecdsa.PrivateKey, batch []*signerpb.Entry) (*svid, error) {
	if r.GetError() != "" {
		return nil, fmt.Errorf("entry %q refused by signer: %s", r.GetEntryId(), r.GetError())
	}
	key, ok := keys[r.GetEntryId()]
	if !ok || len(r.GetChain()) == 0 {
		return nil, fmt.Errorf("entry %q: unexpected answer from signer", r.GetEntryId())
	}
	var e *signerpb.Entry
	for _, b := range batch {
		if b.GetId() == r.GetEntryId() {
			e = b
		}
	}
	var chain []*x509.Certificate
	for _, der := range r.GetChain() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("entry %q: parse SVID: %w", e.GetId(), err)
		}
		chain = append(chain, c)
	}
	if !publicKeysEqual(chain[0].PublicKey, key.Public()) {
		return nil, fmt.Errorf("entry %q: SVID is not for the key we generated", e.GetId())
	}
	if err := checkSignedFor(chain[0], e, r.GetRevision()); err != nil {
		return nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("entry %q: encode key: %w", e.GetId(), err)
	}
	return &svid{entryID: e.GetId(), revision: e.GetRevision(), chain: chain, keyPKCS8: pkcs8, jitter: a.jitter(), received: time.Now()}, nil
}

// renewLoop keeps every entry's SVID fresh: it wakes on a sync change or
// when the next SVID falls due, drops expired SVIDs first so they are never
// served, and retries failures with backoff.
func (a *Agent) renewLoop(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	failures := 0
	for {
		select {
		case <-a.wakeRenew:
		case <-timer.C:
		case <-ctx.Done():
			return nil
		}
		now := time.Now()
		if n := a.cache.expire(now); n > 0 {
			a.log.Warn("x509-svids expired before renewal", "count", n)
		}
		missing, renew, next := a.cache.due(now, a.sched)
		paced := len(renew) > renewBatch
		renew = renew[:min(len(renew), renewBatch)]
		if work := append(missing, renew...); len(work) > 0 {
			got, err := a.signEntries(ctx, work)
			if stale := a.cache.putSVIDs(got); stale > 0 {
				// The policy changed while they were signed: the sync
				// that changed it woke this loop to sign them again.
				a.log.Info("x509-svids discarded: entry changed while signing", "count", stale)
			}
			a.recordIssued(got)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				a.checkUnauthenticated(err)
				failures++
				a.renewFailures.Store(int64(failures))
				// Retry sooner as the first SVID held nears expiry, so a
				// signer that comes back is found while it is still valid.
				var remaining time.Duration
				if earliest, ok := a.cache.earliestNotAfter(); ok {
					remaining = time.Until(earliest)
				}
				retry := time.Now().Add(a.backoff.DelayBefore(failures, a.rand(), remaining))
				a.log.Error("x509-svid renewal failed", "error", err, "failures", failures, "retry_at", retry.Format(time.RFC3339Nano))
				if next.IsZero() || retry.Before(next) {
					next = retry
				}
			} else {
				failures = 0
				a.renewFailures.Store(0)
				// The fresh SVIDs come due later; recompute.
				_, _, next = a.cache.due(time.Now(), a.sched)
				if paced {
					next = time.Now().Add(time.Duration(a.rand() * float64(renewSpread)))
				}
			}
		}
		if a.synced.Load() {
			a.markReady()
		}
		if !next.IsZero() {
			timer.Reset(max(time.Until(next), 0))
		}
	}
}

// recordIssued counts and audits freshly signed SVIDs (README "Audit
// log": entry, spiffe_id, serial, not_after; never the key).
func (a *Agent) recordIssued(got []*svid) {
	a.metrics.svidsIssued.WithLabelValues("x509").Add(float64(len(got)))
	for _, s := range got {
		a.log.Info("x509-svid issued", "entry", s.entryID, "spiffe_id", s.chain[0].URIs[0].String(),
			"serial", s.chain[0].SerialNumber.Text(16), "not_after", s.notAfter().UTC().Format(time.RFC3339))
	}
}

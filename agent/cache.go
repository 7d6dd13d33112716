package agent

import (
	"bytes"
	"crypto/x509"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

// svid is one workload X.509-SVID held in agent memory. The private key is
// kept only as the PKCS#8 bytes handed to the attested caller.
type svid struct {
	key      entryKey // the entry revision it was signed for
	chain    []*x509.Certificate
	keyPKCS8 []byte
	// received is when the agent got it. Renewal is scheduled over
	// [received, NotAfter], not the certificate's NotBefore, which the
	// signer backdates for clock skew: for a 10 s SVID the backdate would
	// otherwise put the half-life at the instant of issue.
	received time.Time
	jitter   float64 // drawn once, so the renewal instant is stable
}

func (s *svid) notAfter() time.Time { return s.chain[0].NotAfter }
func (s *svid) renewAt(sched rotator.Schedule) time.Time {
	return sched.RenewAt(s.received, s.notAfter(), s.jitter)
}

// cache is what the agent can serve right now: the entries its node may
// serve, the SVIDs it holds for them, the trust bundle and the JWT bundle.
// It implements workloadapi.Source. Each distinct response is built once
// and shared by every caller entitled to the same set of SVIDs, until the
// next change. Its methods live here (X.509 side) and in jwtbundle.go
// (JWT side).
type cache struct {
	mu        sync.Mutex
	entries   []*entry            // in policy order
	byID      map[string]*entry   // the same entries
	svids     map[entryKey]*svid  // only for the current revision of an entry
	bundle    []*x509.Certificate // the trust bundle
	bundleDER []byte
	changed   broadcast
	responses map[string]*workload.X509SVIDResponse // by matched-SVID key
	// matched is, per caller selector set, the matched-SVID key it got,
	// so that a stream woken by a rotation skips matching every entry
	// again (tens of µs at 1,000 entries, times every open stream; see
	// BENCHMARKS.md). It holds while the entries and the set of entries
	// with an SVID stay the same.
	matched map[string]string
	bundles *workload.X509BundlesResponse
	td      string    // the trust domain's SPIFFE ID: bundle maps are keyed by it (Workload API spec)
	jwt     *jwtState // nil before the first bundle with JWT keys
	synced  bool      // the entries arrived at least once

	// The federated side (federation.go): the bundles of foreign trust
	// domains, and the responses built from them per federation key (the
	// sorted names of the domains a caller's entries federate with).
	federated  map[string]*fedBundle // by trust domain name
	fedKeys    map[string]string     // caller selectors → federation key, like matched
	fedBundles map[string]*workload.X509BundlesResponse
	fedJWT     map[string]*jwtFed
}

func newCache(td string) *cache {
	return &cache{
		byID:      make(map[string]*entry),
		svids:     make(map[entryKey]*svid),
		responses: make(map[string]*workload.X509SVIDResponse),
		matched:   make(map[string]string),
		td:        td,

		federated:  make(map[string]*fedBundle),
		fedKeys:    make(map[string]string),
		fedBundles: make(map[string]*workload.X509BundlesResponse),
		fedJWT:     make(map[string]*jwtFed),
	}
}

// notifyLocked drops every shared response and wakes every stream.
func (c *cache) notifyLocked() {
	clear(c.responses)
	clear(c.matched)
	clear(c.fedKeys)
	clear(c.fedBundles)
	clear(c.fedJWT)
	c.bundles = nil
	c.changed.notify()
}

// setEntries replaces the entries. An SVID is served only for the exact
// entry revision it was signed for, so SVIDs of entries that are gone or
// changed are dropped here, keys and all: a changed entry serves nothing
// until its new SVID is signed (the renewer sees it missing at once).
func (c *cache) setEntries(entries []*entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	// A re-sync that brings nothing new (a reconnection, a move to
	// another signer replica) wakes no stream: every workload stream would
	// re-send what it holds.
	if c.synced && slices.EqualFunc(c.entries, entries, sameEntry) {
		return
	}
	c.entries, c.synced = entries, true
	c.byID = make(map[string]*entry, len(entries))
	for _, e := range entries {
		c.byID[e.ID] = e
	}
	for k := range c.svids {
		if !c.currentLocked(k) {
			delete(c.svids, k)
		}
	}
	c.notifyLocked()
}

// sameEntry reports whether a and b are the same revision of an entry.
// The revision covers federates_with too; comparing it as well keeps a
// federation change from going unserved if a signer ever did not.
func sameEntry(a, b *entry) bool {
	return a.ID == b.ID && a.Revision == b.Revision && slices.Equal(a.FederatesWith, b.FederatesWith)
}

// hasSynced reports whether the entries arrived at least once: before,
// no entry matching a caller means nothing.
func (c *cache) hasSynced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.synced
}

// currentLocked reports whether k is the current revision of an entry.
func (c *cache) currentLocked(k entryKey) bool {
	e, ok := c.byID[k.id]
	return ok && e.Revision == k.revision
}

// setBundle replaces the trust bundle; it reports whether it changed.
func (c *cache) setBundle(cas []*x509.Certificate) bool {
	var der bytes.Buffer
	for _, ca := range cas {
		der.Write(ca.Raw)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if bytes.Equal(der.Bytes(), c.bundleDER) {
		return false
	}
	c.bundle, c.bundleDER = cas, der.Bytes()
	c.notifyLocked()
	return true
}

// putSVIDs stores freshly signed SVIDs and wakes streams once. An SVID
// signed for a revision the entry no longer has (the policy changed while
// it was being signed) or for an entry that is gone is not stored; the
// count of those is returned.
func (c *cache) putSVIDs(ss []*svid) (stale int) {
	if len(ss) == 0 {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var stored []*svid
	for _, s := range ss {
		if !c.currentLocked(s.key) {
			stale++
			continue
		}
		if _, ok := c.svids[s.key]; !ok {
			clear(c.matched) // an entry starts to match
		}
		c.svids[s.key] = s
		stored = append(stored, s)
	}
	if len(stored) == 0 {
		return stale
	}
	// Keep the shared responses that contain none of the new SVIDs, so
	// streams of unrelated callers wake, find the same response, and send
	// nothing.
	for key := range c.responses {
		for _, s := range stored {
			if strings.Contains("\x00"+key, "\x00"+s.key.id+"\x00") {
				delete(c.responses, key)
				break
			}
		}
	}
	c.changed.notify()
	return stale
}

// expire removes SVIDs past their NotAfter so no caller is ever handed an
// expired identity, and reports how many it removed.
func (c *cache) expire(now time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, s := range c.svids {
		if !now.Before(s.notAfter()) {
			delete(c.svids, k)
			n++
		}
	}
	if n > 0 {
		c.notifyLocked()
	}
	return n
}

// due sorts the entries that need a new SVID at now into missing (none
// for the entry's current revision: urgent, a caller may be waiting) and
// renew (valid but past its renewal point: can wait a little). It also
// returns the earliest instant at which anything else falls due or
// expires.
func (c *cache) due(now time.Time, sched rotator.Schedule) (missing, renew []*entry, next time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		s, ok := c.svids[e.key()]
		if !ok {
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

// X509SVIDResponse returns the response for a caller with these selectors
// (nil when it is entitled to no SVID we hold) and a channel closed on the
// next change.
func (c *cache) X509SVIDResponse(selectors []string) (*workload.X509SVIDResponse, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sel := strings.Join(selectors, "\x00")
	key, ok := c.matched[sel]
	if !ok {
		key = c.matchLocked(selectors)
		if len(c.matched) >= maxMatched {
			clear(c.matched) // callers with ever new selectors cannot grow it without bound
		}
		c.matched[sel] = key
	}
	if key == "" {
		return nil, c.changed.C()
	}
	if r, ok := c.responses[key]; ok {
		return r, c.changed.C()
	}
	r := &workload.X509SVIDResponse{FederatedBundles: c.federatedDERLocked(key)}
	for id := range strings.SplitSeq(strings.TrimSuffix(key, "\x00"), "\x00") {
		e := c.byID[id]
		s := c.svids[e.key()]
		var chain bytes.Buffer
		for _, cert := range s.chain {
			chain.Write(cert.Raw)
		}
		r.Svids = append(r.Svids, &workload.X509SVID{
			// The certificate's own ID: the label can never differ from
			// what the SVID proves (matchLocked already demands the
			// revision it was signed for).
			SpiffeId:    s.chain[0].URIs[0].String(),
			X509Svid:    chain.Bytes(),
			X509SvidKey: s.keyPKCS8,
			Bundle:      c.bundleDER,
			Hint:        e.Hint,
		})
	}
	c.responses[key] = r
	return r, c.changed.C()
}

// Pending reports whether a caller with these selectors matches an entry
// whose SVID for the current revision is not held right now (just added
// or changed, or lapsed while the signer was away). Such a caller is
// entitled: it waits, or is told Unavailable, never PermissionDenied.
func (c *cache) Pending(selectors []string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		if _, ok := c.svids[e.key()]; ok {
			continue
		}
		if matches(e.Selectors, selectors) {
			return true
		}
	}
	return false
}

// maxMatched bounds cache.matched.
const maxMatched = 4096

// matchLocked returns the matched-SVID key of a caller with these
// selectors: the IDs of the entries it matches that hold an SVID for
// their current revision, in policy order, each followed by a NUL; ""
// when it matches none.
func (c *cache) matchLocked(selectors []string) string {
	var keyb strings.Builder
	for _, e := range c.entries {
		if _, ok := c.svids[e.key()]; !ok || !matches(e.Selectors, selectors) {
			continue
		}
		keyb.WriteString(e.ID)
		keyb.WriteByte(0)
	}
	return keyb.String()
}

// holdsValidSVID reports whether any SVID held is valid at now: what the
// Workload API's health service reports as SERVING.
func (c *cache) holdsValidSVID(now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.svids {
		if now.Before(s.notAfter()) {
			return true
		}
	}
	return false
}

// X509BundlesResponse returns the response holding the agent's own trust
// bundle only, and a channel closed on the next change.
func (c *cache) X509BundlesResponse() (*workload.X509BundlesResponse, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ownBundlesLocked(), c.changed.C()
}

func (c *cache) ownBundlesLocked() *workload.X509BundlesResponse {
	if c.bundles == nil && len(c.bundleDER) > 0 {
		c.bundles = &workload.X509BundlesResponse{Bundles: map[string][]byte{c.td: c.bundleDER}}
	}
	return c.bundles
}

// matches reports whether every selector the entry requires is among the
// caller's. Both lists are short; the caller's is sorted.
func matches(required, have []string) bool {
	for _, r := range required {
		if _, ok := slices.BinarySearch(have, r); !ok {
			return false
		}
	}
	return len(required) > 0
}

// earliestNotAfter returns when the first SVID held expires; ok is false
// when none is held.
func (c *cache) earliestNotAfter() (t time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.svids {
		if !ok || s.notAfter().Before(t) {
			t, ok = s.notAfter(), true
		}
	}
	return t, ok
}

// explain sorts the cache's entries into those selectors match and those
// they do not, the latter with what they lack.
func (c *cache) explain(selectors []string) *Explanation {
	have := slices.Clone(selectors)
	slices.Sort(have)
	ex := &Explanation{Selectors: have, Matching: []ExplainedEntry{}, NotMatching: []ExplainedEntry{}}
	c.mu.Lock()
	defer c.mu.Unlock()
	ex.Synced = c.synced
	for _, e := range c.entries {
		ee := ExplainedEntry{ID: e.ID, SPIFFEID: e.SPIFFEID.String(), Hint: e.Hint, Selectors: slices.Clone(e.Selectors)}
		if matches(e.Selectors, have) {
			if s, ok := c.svids[e.key()]; ok {
				ee.Serial = s.chain[0].SerialNumber.Text(16)
				ee.NotAfter = timePtr(s.notAfter())
			}
			ex.Matching = append(ex.Matching, ee)
			continue
		}
		for _, sel := range e.Selectors {
			if _, ok := slices.BinarySearch(have, sel); !ok {
				ee.Missing = append(ee.Missing, sel)
			}
		}
		ex.NotMatching = append(ex.NotMatching, ee)
	}
	return ex
}

// cacheSnapshot is what the cache holds, for the status report.
type cacheSnapshot struct {
	BundleNotAfter   []time.Time
	SVIDs            []svidStatus      // one per entry, in policy order
	EntriesWithoutID int               // entries that have no valid SVID now
	JWTKeyIDs        []string          // the JWT bundle's key IDs, as the signer orders them
	Federated        []federatedStatus // by trust domain name
}

// svidStatus describes the SVID held for one entry.
type svidStatus struct {
	EntryID  string
	SPIFFEID string
	Serial   string // "" when there is no valid SVID
	NotAfter time.Time
	RenewAt  time.Time
}

// snapshot returns a consistent view of what the cache holds.
func (c *cache) snapshot(sched rotator.Schedule) cacheSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	var st cacheSnapshot
	if c.jwt != nil {
		for _, k := range c.jwt.keys {
			st.JWTKeyIDs = append(st.JWTKeyIDs, k.GetKeyId())
		}
	}
	for _, ca := range c.bundle {
		st.BundleNotAfter = append(st.BundleNotAfter, ca.NotAfter)
	}
	for _, e := range c.entries {
		ss := svidStatus{EntryID: e.ID, SPIFFEID: e.SPIFFEID.String()}
		if s, ok := c.svids[e.key()]; ok {
			ss.Serial = s.chain[0].SerialNumber.Text(16)
			ss.NotAfter = s.notAfter()
			ss.RenewAt = s.renewAt(sched)
		} else {
			st.EntriesWithoutID++
		}
		st.SVIDs = append(st.SVIDs, ss)
	}
	st.Federated = c.federatedStatusLocked()
	return st
}

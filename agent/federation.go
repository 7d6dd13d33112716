package agent

import (
	"bytes"
	"crypto/x509"
	"errors"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// SPIFFE federation, the agent's half: the signer fetches the bundles of
// the trust domains its policy federates with and pushes them on the sync
// stream (SyncResponse.federated_bundles); the agent keeps them here and
// gives each caller those its entries name in federates_with, in
// FetchX509SVID's federated_bundles, FetchX509Bundles, FetchJWTBundles
// and ValidateJWTSVID. A caller whose entries name no foreign domain sees
// exactly what it saw before federation existed.

// fedBundle is the trust bundle of one federated trust domain, as the
// signer last fetched it. It is built once, never changed afterwards
// (but for its sequence, under the cache's lock) and shared by every
// response that carries it.
type fedBundle struct {
	td       spiffeid.TrustDomain
	sequence uint64 // the domain's spiffe_sequence
	cas      []*x509.Certificate
	der      []byte    // the CAs concatenated, as the Workload API carries them
	jwt      *jwtState // nil when the domain publishes no JWT keys
}

// errOwnFederated refuses a federated bundle that claims the agent's own
// trust domain: only the signer's own bundle may speak for it.
var errOwnFederated = errors.New("federated bundle of the agent's own trust domain")

// federatedFrom converts the federated bundles of a Sync message. A
// bundle that is malformed (a trust domain name that is not one, a CA
// certificate or JWT key that does not parse, no authority at all), that
// claims the agent's own trust domain or repeats a domain already given
// is refused with a log line; the others are still applied. refused
// names the valid domains among the refused, whose last good bundle the
// cache keeps: a signer glitch must not take a federation away.
func federatedFrom(in []*signerpb.Bundle, own spiffeid.TrustDomain, log hclog.Logger) (good []*fedBundle, refused []spiffeid.TrustDomain) {
	seen := make(map[spiffeid.TrustDomain]bool, len(in))
	for _, b := range in {
		td, err := spiffeid.TrustDomainFromString(b.GetTrustDomain())
		if err != nil {
			log.Error("bad federated bundle from signer", "trust_domain", b.GetTrustDomain(), "error", err)
			continue
		}
		var fb *fedBundle
		switch {
		case td == own:
			err = errOwnFederated
		case seen[td]:
			err = errors.New("trust domain sent twice")
		default:
			fb, err = newFedBundle(td, b)
		}
		if err != nil {
			log.Error("bad federated bundle from signer", "trust_domain", td.Name(), "sequence", b.GetSequence(), "error", err)
			if td != own && !seen[td] {
				refused = append(refused, td)
			}
			seen[td] = true
			continue
		}
		seen[td] = true
		good = append(good, fb)
	}
	return good, refused
}

// newFedBundle parses one federated bundle.
func newFedBundle(td spiffeid.TrustDomain, b *signerpb.Bundle) (*fedBundle, error) {
	cas, err := parseCerts("X.509 authority", b.GetX509Authorities())
	if err != nil {
		return nil, err
	}
	if len(cas) == 0 && len(b.GetJwtAuthorities()) == 0 {
		return nil, errors.New("bundle has no X.509 authority and no JWT key")
	}
	fb := &fedBundle{td: td, sequence: b.GetSequence(), cas: cas}
	for _, ca := range cas {
		fb.der = append(fb.der, ca.Raw...)
	}
	if len(b.GetJwtAuthorities()) > 0 {
		if fb.jwt, err = newJWTState(td, b.GetJwtAuthorities()); err != nil {
			return nil, err
		}
	}
	return fb, nil
}

// sameContent reports whether a and b serve the same authorities; the
// sequence alone changes nothing a workload sees.
func (a *fedBundle) sameContent(b *fedBundle) bool {
	return bytes.Equal(a.der, b.der) && (a.jwt == nil) == (b.jwt == nil) &&
		(a.jwt == nil || sameJWTKeys(a.jwt.keys, b.jwt.keys))
}

// fedChange is one federated domain whose served bundle changed.
type fedChange struct {
	td      spiffeid.TrustDomain
	bundle  *fedBundle // the new bundle; nil when dropped
	dropped bool
}

// setFederated replaces the federated bundles: good as given, the last
// good bundle kept for each domain in refused, and every other domain
// dropped (the signer no longer federates with it for this node). Only
// the responses that carry a changed domain are rebuilt, so the streams
// of other callers wake and send nothing. It returns what changed.
func (c *cache) setFederated(good []*fedBundle, refused []spiffeid.TrustDomain) []fedChange {
	c.mu.Lock()
	defer c.mu.Unlock()
	next := make(map[string]*fedBundle, len(good)+len(refused))
	var changes []fedChange
	for _, fb := range good {
		old, ok := c.federated[fb.td.Name()]
		if ok && old.sameContent(fb) {
			old.sequence = fb.sequence
			next[fb.td.Name()] = old
			continue
		}
		next[fb.td.Name()] = fb
		changes = append(changes, fedChange{td: fb.td, bundle: fb})
	}
	for _, td := range refused {
		if old, ok := c.federated[td.Name()]; ok {
			next[td.Name()] = old
		}
	}
	for name, old := range c.federated {
		if _, ok := next[name]; !ok {
			changes = append(changes, fedChange{td: old.td, dropped: true})
		}
	}
	c.federated = next
	if len(changes) == 0 {
		return nil
	}
	changed := make(map[string]bool, len(changes))
	for _, ch := range changes {
		changed[ch.td.Name()] = true
	}
	for key := range c.responses {
		if c.keyFederatesLocked(key, changed) {
			delete(c.responses, key)
		}
	}
	for key := range c.fedBundles {
		if fedKeyHas(key, changed) {
			delete(c.fedBundles, key)
		}
	}
	for key := range c.fedJWT {
		if fedKeyHas(key, changed) {
			delete(c.fedJWT, key)
		}
	}
	c.changed.notify()
	slices.SortFunc(changes, func(a, b fedChange) int { return strings.Compare(a.td.Name(), b.td.Name()) })
	return changes
}

// keyFederatesLocked reports whether any entry of a matched-SVID key
// federates with a domain in tds.
func (c *cache) keyFederatesLocked(key string, tds map[string]bool) bool {
	for id := range strings.SplitSeq(strings.TrimSuffix(key, "\x00"), "\x00") {
		if e, ok := c.byID[id]; ok {
			for _, td := range e.FederatesWith {
				if tds[td.Name()] {
					return true
				}
			}
		}
	}
	return false
}

// fedKeyHas reports whether a federation key names a domain in tds.
func fedKeyHas(key string, tds map[string]bool) bool {
	for name := range strings.SplitSeq(key, "\x00") {
		if tds[name] {
			return true
		}
	}
	return false
}

// fedKey returns the federation key of a set of entries: the names of the
// trust domains they federate with, sorted, NUL-separated; "" for none.
func fedKey(entries []*entry) string {
	var names []string
	for _, e := range entries {
		for _, td := range e.FederatesWith {
			names = append(names, td.Name())
		}
	}
	slices.Sort(names)
	return strings.Join(slices.Compact(names), "\x00")
}

// fedKeyForLocked returns the federation key of a caller with these
// selectors: that of every entry it matches, whether or not an SVID is
// held for it (bundles are due as soon as the entry is).
func (c *cache) fedKeyForLocked(selectors []string) string {
	sel := strings.Join(selectors, "\x00")
	if key, ok := c.fedKeys[sel]; ok {
		return key
	}
	var matching []*entry
	for _, e := range c.entries {
		if len(e.FederatesWith) > 0 && matches(e.Selectors, selectors) {
			matching = append(matching, e)
		}
	}
	key := fedKey(matching)
	if len(c.fedKeys) >= maxMatched {
		clear(c.fedKeys) // callers with ever new selectors cannot grow it without bound
	}
	c.fedKeys[sel] = key
	return key
}

// heldLocked returns the bundles held for the domains of a federation
// key, in its order; a domain the signer has not fetched yet is skipped.
func (c *cache) heldLocked(key string) []*fedBundle {
	if key == "" {
		return nil
	}
	var out []*fedBundle
	for name := range strings.SplitSeq(key, "\x00") {
		if fb, ok := c.federated[name]; ok {
			out = append(out, fb)
		}
	}
	return out
}

// federatedDERLocked returns the federated_bundles of the X.509-SVID
// response for a matched-SVID key: the X.509 bundles of the domains its
// entries federate with, keyed by the domain's SPIFFE ID; nil for none.
func (c *cache) federatedDERLocked(key string) map[string][]byte {
	var entries []*entry
	for id := range strings.SplitSeq(strings.TrimSuffix(key, "\x00"), "\x00") {
		entries = append(entries, c.byID[id])
	}
	var out map[string][]byte
	for _, fb := range c.heldLocked(fedKey(entries)) {
		if len(fb.der) == 0 {
			continue // a JWT-only domain
		}
		if out == nil {
			out = make(map[string][]byte)
		}
		out[fb.td.IDString()] = fb.der
	}
	return out
}

// X509BundlesFor returns the X.509 bundles for a caller with these
// selectors: the agent's own, and those of the federated domains its
// entries federate with (nil before the own bundle arrives), and a
// channel closed on the next change.
func (c *cache) X509BundlesFor(selectors []string) (*workload.X509BundlesResponse, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	own := c.ownBundlesLocked()
	key := c.fedKeyForLocked(selectors)
	if own == nil || key == "" {
		return own, c.changed.C()
	}
	if r, ok := c.fedBundles[key]; ok {
		return r, c.changed.C()
	}
	r := &workload.X509BundlesResponse{Bundles: maps.Clone(own.GetBundles())}
	for _, fb := range c.heldLocked(key) {
		if len(fb.der) > 0 {
			r.Bundles[fb.td.IDString()] = fb.der
		}
	}
	if len(c.fedBundles) >= maxMatched {
		clear(c.fedBundles)
	}
	c.fedBundles[key] = r
	return r, c.changed.C()
}

// jwtFed is the JWT side for one federation key: the own bundle and the
// federated ones, as served and as validated against.
type jwtFed struct {
	resp *workload.JWTBundlesResponse
	set  *jwtbundle.Set
}

// jwtForLocked returns the JWT bundles of a caller with these selectors;
// c.jwt must be set.
func (c *cache) jwtForLocked(selectors []string) (*workload.JWTBundlesResponse, *jwtbundle.Set) {
	key := c.fedKeyForLocked(selectors)
	if key == "" {
		return c.jwt.resp, c.jwt.set
	}
	if f, ok := c.fedJWT[key]; ok {
		return f.resp, f.set
	}
	f := &jwtFed{resp: &workload.JWTBundlesResponse{Bundles: maps.Clone(c.jwt.resp.GetBundles())}, set: jwtbundle.NewSet(c.jwt.bundle)}
	for _, fb := range c.heldLocked(key) {
		if fb.jwt != nil {
			f.resp.Bundles[fb.td.IDString()] = fb.jwt.jwks
			f.set.Add(fb.jwt.bundle)
		}
	}
	if len(c.fedJWT) >= maxMatched {
		clear(c.fedJWT)
	}
	c.fedJWT[key] = f
	return f.resp, f.set
}

// federatedStatus is one federated bundle held, for the status report.
type federatedStatus struct {
	TrustDomain string
	Sequence    uint64
	CANotAfter  []time.Time
	JWTKeyIDs   []string
}

func (c *cache) federatedStatusLocked() []federatedStatus {
	var out []federatedStatus
	for _, name := range slices.Sorted(maps.Keys(c.federated)) {
		fb := c.federated[name]
		st := federatedStatus{TrustDomain: name, Sequence: fb.sequence}
		for _, ca := range fb.cas {
			st.CANotAfter = append(st.CANotAfter, ca.NotAfter)
		}
		if fb.jwt != nil {
			for _, k := range fb.jwt.keys {
				st.JWTKeyIDs = append(st.JWTKeyIDs, k.GetKeyId())
			}
		}
		out = append(out, st)
	}
	return out
}

// logFederated logs each change setFederated reports.
func logFederated(log hclog.Logger, changes []fedChange) {
	for _, ch := range changes {
		if ch.dropped {
			log.Info("federated bundle dropped", "trust_domain", ch.td.Name())
			continue
		}
		jwtKeys := 0
		if ch.bundle.jwt != nil {
			jwtKeys = len(ch.bundle.jwt.keys)
		}
		log.Info("federated bundle updated", "trust_domain", ch.td.Name(), "sequence", ch.bundle.sequence,
			"authorities", len(ch.bundle.cas), "jwt_keys", jwtKeys)
	}
}

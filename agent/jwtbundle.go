package agent

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/go-jose/go-jose/v4"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// jwtState is the JWT bundle as the agent serves it, built once per change
// and shared: the go-spiffe bundle ValidateJWTSVID checks against, and the
// FetchJWTBundles response.
type jwtState struct {
	keys   []*signerpb.JWTAuthority // as received, to tell a change
	bundle *jwtbundle.Bundle
	jwks   []byte // the bundle as FetchJWTBundles serves it
	set    *jwtbundle.Set
	resp   *workload.JWTBundlesResponse
}

// newJWTState parses the signer's JWT authorities into the served forms.
// The JWKS carries "use": "jwt-svid" on every key, as the SPIFFE bundle
// format requires (go-spiffe's own Marshal leaves it out).
func newJWTState(td spiffeid.TrustDomain, keys []*signerpb.JWTAuthority) (*jwtState, error) {
	b := jwtbundle.New(td)
	doc := struct {
		Keys []jose.JSONWebKey `json:"keys"`
	}{Keys: make([]jose.JSONWebKey, 0, len(keys))}
	for _, k := range keys {
		pub, err := x509.ParsePKIXPublicKey(k.GetPublicKey())
		if err != nil {
			return nil, fmt.Errorf("JWT key %q: %w", k.GetKeyId(), err)
		}
		if err := b.AddJWTAuthority(k.GetKeyId(), pub); err != nil {
			return nil, fmt.Errorf("JWT key %q: %w", k.GetKeyId(), err)
		}
		doc.Keys = append(doc.Keys, jose.JSONWebKey{Key: pub, KeyID: k.GetKeyId(), Use: "jwt-svid"})
	}
	jwks, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("encode JWT bundle: %w", err)
	}
	return &jwtState{
		keys:   keys,
		bundle: b,
		jwks:   jwks,
		set:    jwtbundle.NewSet(b),
		resp:   &workload.JWTBundlesResponse{Bundles: map[string][]byte{td.IDString(): jwks}},
	}, nil
}

// sameJWTKeys reports whether a and b publish the same keys in the same
// order; expires_at alone does not change what is served.
func sameJWTKeys(a, b []*signerpb.JWTAuthority) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].GetKeyId() != b[i].GetKeyId() || !bytes.Equal(a[i].GetPublicKey(), b[i].GetPublicKey()) {
			return false
		}
	}
	return true
}

// setJWTBundle replaces the JWT bundle; it reports whether it changed.
// Only the JWT bundle streams have something new: the X.509 responses are
// kept, so their streams wake and send nothing.
func (c *cache) setJWTBundle(td spiffeid.TrustDomain, keys []*signerpb.JWTAuthority) (bool, error) {
	c.mu.Lock()
	same := c.jwt != nil && sameJWTKeys(c.jwt.keys, keys)
	c.mu.Unlock()
	if same {
		return false, nil
	}
	st, err := newJWTState(td, keys)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.jwt = st
	clear(c.fedJWT) // each holds the old own bundle
	c.changed.notify()
	return true, nil
}

// JWTBundlesResponse returns the JWT bundles for a caller with these
// selectors (nil before the first bundle): the agent's own trust domain's,
// and those of the federated domains its entries federate with. The
// channel is closed on the next change.
func (c *cache) JWTBundlesResponse(selectors []string) (*workload.JWTBundlesResponse, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.jwt == nil {
		return nil, c.changed.C()
	}
	resp, _ := c.jwtForLocked(selectors)
	return resp, c.changed.C()
}

// JWTBundles returns the JWT bundles a caller with these selectors
// validates tokens against, as JWTBundlesResponse: empty before the first
// bundle.
func (c *cache) JWTBundles(selectors []string) *jwtbundle.Set {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.jwt == nil {
		return jwtbundle.NewSet()
	}
	_, set := c.jwtForLocked(selectors)
	return set
}

// jwtEntries returns the entries a caller with these selectors may have a
// JWT-SVID for, in the same order as its X.509-SVIDs, one per SPIFFE ID,
// and only the one for id when it is not zero. Unlike X.509-SVIDs a
// JWT-SVID needs nothing held in advance: every matching entry counts.
func (c *cache) jwtEntries(selectors []string, id spiffeid.ID) []*entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*entry
	for _, e := range c.entries {
		if !id.IsZero() && e.SPIFFEID != id {
			continue
		}
		if !matches(e.Selectors, selectors) {
			continue
		}
		if slices.ContainsFunc(out, func(o *entry) bool { return o.SPIFFEID == e.SPIFFEID }) {
			continue
		}
		out = append(out, e)
	}
	return out
}

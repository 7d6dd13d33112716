package agent

import (
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// entry is one workload entry the agent's node may serve, converted once
// from the wire where Sync messages arrive (entriesFrom): past that edge
// the agent never handles a SPIFFE ID as a string.
type entry struct {
	ID        string // the policy workload block's name
	Revision  uint64 // changes whenever anything in the entry changes
	SPIFFEID  spiffeid.ID
	Selectors []string
	Hint      string
	X509TTL   time.Duration
	JWTTTL    time.Duration
	// FederatesWith names the foreign trust domains (policy
	// federates_with) whose bundles a caller matching this entry is
	// given and whose JWT-SVIDs it may validate; sorted, without
	// duplicates or the agent's own.
	FederatesWith []spiffeid.TrustDomain
	// Actions are the action identities a caller matching this entry
	// may ask for (action.go); nil when the policy allows none.
	Actions *actionPolicy
}

// entryKey names one revision of an entry. The agent's caches are keyed
// by it, so that an SVID or token signed for one revision can never be
// found under another: a policy edit that changes an entry's selectors
// or ID leaves the old identity unreachable by construction.
type entryKey struct {
	id       string
	revision uint64
}

func (e *entry) key() entryKey { return entryKey{e.ID, e.Revision} }

// entriesFrom converts the entries of a Sync message, dropping those the
// agent cannot serve correctly (the signer validated them; this guards
// against a signer of another trust domain). It sorts nothing: policy
// order is the response order.
func entriesFrom(in []*signerpb.Entry, td spiffeid.TrustDomain, log hclog.Logger) []*entry {
	out := make([]*entry, 0, len(in))
	for _, e := range in {
		id, err := spiffeid.FromString(e.GetSpiffeId())
		if err != nil || id.TrustDomain() != td || len(e.GetSelectors()) == 0 {
			log.Warn("ignoring invalid entry from signer", "entry", e.GetId(), "spiffe_id", e.GetSpiffeId())
			continue
		}
		out = append(out, &entry{
			ID: e.GetId(), Revision: e.GetRevision(), SPIFFEID: id, Selectors: e.GetSelectors(), Hint: e.GetHint(),
			X509TTL: time.Duration(e.GetX509TtlSeconds()) * time.Second, JWTTTL: time.Duration(e.GetJwtTtlSeconds()) * time.Second,
			FederatesWith: federatesWith(e, td, log), Actions: actionsFrom(e),
		})
	}
	return out
}

// federatesWith converts an entry's federates_with. A name that is not a
// trust domain, or is the agent's own, is left out with a warning: the
// rest of the entry is still served, only without that bundle.
func federatesWith(e *signerpb.Entry, own spiffeid.TrustDomain, log hclog.Logger) []spiffeid.TrustDomain {
	var out []spiffeid.TrustDomain
	for _, name := range e.GetFederatesWith() {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil || td == own {
			log.Warn("ignoring invalid federates_with of entry from signer", "entry", e.GetId(), "trust_domain", name)
			continue
		}
		out = append(out, td)
	}
	slices.SortFunc(out, func(a, b spiffeid.TrustDomain) int { return strings.Compare(a.Name(), b.Name()) })
	return slices.Compact(out)
}

// parseCerts parses a chain or a bundle as the signer sends them: one
// DER certificate per element. what names it in the error.
func parseCerts(what string, ders [][]byte) ([]*x509.Certificate, error) {
	out := make([]*x509.Certificate, 0, len(ders))
	for _, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", what, err)
		}
		out = append(out, c)
	}
	return out, nil
}

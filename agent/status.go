package agent

import (
	"slices"
	"time"

	"github.com/lanyard-dev/lanyard/workloadapi"
)

// Status is a snapshot of what the agent holds and how its upstream is
// doing: the facts `lanyard-agent status` reports.
type Status struct {
	AgentID          string    // the agent SVID's SPIFFE ID; "" before the first attestation
	AgentNotAfter    time.Time // zero before the first attestation
	AgentRenewAt     time.Time // next attestation
	NodeSelectors    []string
	LastSync         time.Time // last message on the sync stream; zero if none yet
	SyncConnected    bool      // the sync stream is open and has delivered a message
	SyncFailures     int       // consecutive broken sync streams
	AttestFailures   int       // consecutive failed attestations
	RenewFailures    int       // consecutive failed renewal rounds
	BundleNotAfter   []time.Time
	SVIDs            []SVIDStatus // one per entry, in policy order
	StartedAt        time.Time
	ServingSince     time.Time        // zero until the Workload API listens
	EntriesWithoutID int              // entries the node may serve that have no valid SVID now
	JWTKeyIDs        []string         // the JWT bundle's key IDs, as the signer orders them
	JWTTokensCached  int              // JWT-SVIDs in the token cache
	OpenStreams      map[string]int64 // open Workload API streams by method
	// TPMError says why the TPM is unreachable (its command stream broke
	// and reopening it fails so far); "" while it answers.
	TPMError          string
	TPMLostAt         time.Time // when it was found unreachable; zero while it answers
	TPMReopenFailures int       // failed attempts to open it again since then
	// Exhaustion lists the Workload API limits callers reached now or
	// within the last minute, and failed accepts.
	Exhaustion []workloadapi.Exhaustion
}

// SVIDStatus describes the SVID held for one entry.
type SVIDStatus struct {
	EntryID  string
	SPIFFEID string
	Serial   string // "" when there is no valid SVID
	NotAfter time.Time
	RenewAt  time.Time
}

// Status returns a consistent snapshot of the agent's state.
func (a *Agent) Status() Status {
	st := Status{
		LastSync:       timeFromNanos(a.lastSync.Load()),
		SyncFailures:   int(a.syncFailures.Load()),
		SyncConnected:  a.syncConnected.Load(),
		AttestFailures: int(a.attestFailures.Load()),
		RenewFailures:  int(a.renewFailures.Load()),
		StartedAt:      a.started,
		ServingSince:   timeFromNanos(a.servingSince.Load()),
		OpenStreams:    a.metrics.openStreams(),
	}
	if a.api != nil {
		st.Exhaustion = a.api.Exhaustion(time.Now())
	}
	if a.up != nil {
		if svid := a.up.agentSVID(); svid != nil {
			leaf := svid.Certificates[0]
			st.AgentID, st.AgentNotAfter = svid.ID.String(), leaf.NotAfter
			st.AgentRenewAt = timeFromNanos(a.agentRenewAt.Load())
		}
		a.up.mu.Lock()
		st.NodeSelectors = slices.Clone(a.up.nodes)
		a.up.mu.Unlock()
	}
	if a.jwt != nil {
		st.JWTTokensCached = a.jwt.cached()
	}
	if a.tpm != nil {
		if ts := a.tpm.state(); !ts.Reachable {
			st.TPMError, st.TPMLostAt, st.TPMReopenFailures = ts.Error, ts.LostAt, ts.ReopenFailures
		}
	}
	c := a.cache
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.jwt != nil {
		for _, k := range c.jwt.keys {
			st.JWTKeyIDs = append(st.JWTKeyIDs, k.GetKeyId())
		}
	}
	for _, ca := range c.bundle {
		st.BundleNotAfter = append(st.BundleNotAfter, ca.NotAfter)
	}
	for _, e := range c.entries {
		ss := SVIDStatus{EntryID: e.GetId(), SPIFFEID: e.GetSpiffeId()}
		if s, ok := c.svids[e.GetId()]; ok {
			ss.Serial = s.chain[0].SerialNumber.Text(16)
			ss.NotAfter = s.notAfter()
			ss.RenewAt = s.renewAt(a.sched)
		} else {
			st.EntriesWithoutID++
		}
		st.SVIDs = append(st.SVIDs, ss)
	}
	return st
}

func timeFromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

package signer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/lanyard-dev/lanyard/signer/store"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// applyShared takes a new state from etcd into force on this replica: the
// policy revision, revocations and the registry, and the other replicas'
// keys.
func (s *Signer) applyShared(st store.State) {
	s.applySharedPolicy(st.Policy)
	s.applySharedNodes(st)
	s.applySharedTokens(st)
	s.refreshPeers(time.Now())
}

// applySharedPolicy puts a new policy revision in force. One that does not
// load (apply validated it, so only a replica with another trust domain or
// an older binary can refuse it) leaves the last good one in force here,
// and says so in status and in the log.
func (s *Signer) applySharedPolicy(rec *store.PolicyRecord) {
	t := s.tier
	if rec == nil {
		return
	}
	t.mu.Lock()
	if rec.Revision == t.tried {
		t.mu.Unlock()
		return
	}
	t.tried = rec.Revision
	t.mu.Unlock()
	p, err := policy.ParseFiles([]byte(rec.Source), rec.Filename, s.cfg.TrustDomain, rec.Files)
	if err != nil {
		first := err.Error()
		var es hclconf.Errors
		if errors.As(err, &es) && len(es) > 0 {
			first = es[0].Error()
		}
		msg := fmt.Sprintf("revision %d refused: %s", rec.Revision, first)
		t.mu.Lock()
		t.policyErr = msg
		t.mu.Unlock()
		s.reloads.failed.Add(1)
		s.metrics.PolicyReload(false)
		s.setReloadError(msg)
		s.log.Error("policy revision refused; the last good policy stays in force", "revision", rec.Revision, "applied_by", rec.AppliedBy, "error", err)
		return
	}
	s.mu.Lock()
	s.policySrc = []byte(rec.Source)
	s.setPolicyLocked(p)
	s.notifyLocked()
	agents := len(s.agents)
	s.mu.Unlock()
	t.mu.Lock()
	t.policyRev, t.policyErr = rec.Revision, ""
	t.mu.Unlock()
	s.reloads.ok.Add(1)
	s.metrics.PolicyReload(true)
	s.setReloadError("")
	s.log.Info("policy revision in force", "revision", rec.Revision, "applied_by", rec.AppliedBy,
		"nodes", len(p.Nodes), "workloads", len(p.Workloads), "agents", agents)
}

// applySharedNodes merges the shared registry into this replica's and
// carries out revocations made through any replica: the node's agent
// record is dropped and its Sync streams here end at once.
func (s *Signer) applySharedNodes(st store.State) {
	eks := st.NodesChanged
	if st.Full {
		eks = make([]string, 0, len(st.Nodes)+len(st.Revoked)+len(s.nodes))
		for ek := range st.Nodes {
			eks = append(eks, ek)
		}
		for ek := range st.Revoked {
			eks = append(eks, ek)
		}
		s.mu.Lock()
		for ek := range s.nodes {
			eks = append(eks, ek)
		}
		s.mu.Unlock()
	}
	if len(eks) == 0 {
		return
	}
	var cut []spiffeid.ID
	s.mu.Lock()
	for _, ek := range eks {
		r, known := st.Nodes[ek]
		rev, revoked := st.Revoked[ek]
		n := s.nodes[ek]
		if n == nil {
			if !known && !revoked {
				continue
			}
			n = &NodeInfo{EKSHA256: ek, AgentID: agentIDString(s.cfg.TrustDomain, ek)}
			s.nodes[ek] = n
		}
		if known {
			if !r.LastAttested.Before(n.LastAttested) {
				n.AgentID, n.Nodes, n.TPMManufacturer = r.AgentID, slices.Clone(r.Nodes), r.TPMManufacturer
				n.FirstAttested, n.LastAttested, n.AgentVersion = r.FirstAttested, r.LastAttested, r.AgentVersion
			}
			n.Replica = r.Replica
		}
		switch {
		case revoked && n.Revoked == nil:
			n.Revoked = &Revocation{Reason: rev.Reason, At: rev.At, ByUID: rev.ByUID}
			if id, err := spiffeid.FromString(agentIDString(s.cfg.TrustDomain, ek)); err == nil {
				delete(s.agents, id)
				cut = append(cut, id)
			}
		case !revoked && n.Revoked != nil:
			n.Revoked = nil
			s.log.Info("node revocation lifted through another replica", "ek_sha256", ek)
		}
	}
	s.mu.Unlock()
	for _, id := range cut {
		ended := s.syncs.closeAgent(id, ErrNodeRevoked)
		s.log.Warn("node revoked", "agent", id.String(), "sync_streams_ended", ended, "by_replica", st.Revoked[id.Path()[len(agentPath):]].ByReplica)
	}
}

// queueNodeLocked asks the tier loop to write n to the shared registry
// when it differs from etcd's copy in what node list shows; a renewal
// that only moves last_attested writes at most once per
// nodeRefreshInterval. The caller holds s.mu.
func (s *Signer) queueNodeLocked(n *NodeInfo) {
	t := s.tier
	t.mu.Lock()
	defer t.mu.Unlock()
	shared, ok := t.state.Nodes[n.EKSHA256]
	if ok && shared.FirstAttested.Before(n.FirstAttested) {
		n.FirstAttested = shared.FirstAttested
	}
	if ok && shared.AgentID == n.AgentID && slices.Equal(shared.Nodes, n.Nodes) && shared.TPMManufacturer == n.TPMManufacturer &&
		shared.AgentVersion == n.AgentVersion && shared.Replica == n.Replica && n.LastAttested.Sub(shared.LastAttested) < nodeRefreshInterval {
		return
	}
	t.nodeQueue[n.EKSHA256] = store.NodeRecord{
		EKSHA256: n.EKSHA256, AgentID: n.AgentID, Nodes: slices.Clone(n.Nodes), TPMManufacturer: n.TPMManufacturer,
		FirstAttested: n.FirstAttested, LastAttested: n.LastAttested, AgentVersion: n.AgentVersion, Replica: n.Replica,
	}
	poke(t.nodeDirty)
}

// noteSyncOpen records in the shared registry that agent id now syncs
// with this replica (once per move, not per stream).
func (s *Signer) noteSyncOpen(id spiffeid.ID) {
	if s.tier == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.nodes[id.Path()[len(agentPath):]]
	if n == nil || n.Replica == s.tier.name {
		return
	}
	n.Replica = s.tier.name
	s.queueNodeLocked(n)
}

// writeNodes writes the queued registry records; those not written stay
// queued (unless a newer one replaced them) for the next try.
func (s *Signer) writeNodes(ctx context.Context) error {
	t := s.tier
	t.mu.Lock()
	q := t.nodeQueue
	t.nodeQueue = make(map[string]store.NodeRecord)
	t.mu.Unlock()
	var firstErr error
	for ek, rec := range q {
		if firstErr == nil {
			if err := t.st.PutNode(ctx, rec); err == nil {
				continue
			} else {
				firstErr = err
			}
		}
		t.mu.Lock()
		if _, newer := t.nodeQueue[ek]; !newer {
			t.nodeQueue[ek] = rec
		}
		t.mu.Unlock()
	}
	return firstErr
}

// policyFiles reads the ek_ca files p names, for etcd: every replica
// parses the policy with these contents, never with its own disk.
func policyFiles(p *policy.Policy) (map[string][]byte, error) {
	files := make(map[string][]byte)
	for _, n := range p.Nodes {
		for _, path := range n.EKCA {
			b, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("read ek_ca file: %w", err)
			}
			files[path] = b
		}
	}
	if len(files) == 0 {
		return nil, nil
	}
	return files, nil
}

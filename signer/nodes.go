package signer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/signer/store"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// NodesStateFile is the node registry in state_dir: every agent the signer
// attested, and its revocation if any. Public data only.
const NodesStateFile = "nodes.json"

// maxReasonBytes bounds a revocation reason.
const maxReasonBytes = 512

// The node registry's refusals.
var (
	ErrUnknownNode    = errors.New("unknown node: no agent with that EK SHA-256 or SPIFFE ID was ever attested here")
	ErrBadNodeName    = errors.New("not an EK SHA-256 (64 hex digits) or an agent SPIFFE ID")
	ErrBadReason      = errors.New("bad revocation reason")
	ErrAlreadyRevoked = errors.New("node already revoked")
	ErrNotRevoked     = errors.New("node is not revoked")
	ErrBadNodesState  = errors.New("unusable node registry file")
	// ErrNodeRevoked is the cause a revoked agent's Sync streams end with.
	ErrNodeRevoked = errors.New("node revoked")
)

// NodeInfo is one agent in the registry, as `lanyard-signer node list`
// shows it.
type NodeInfo struct {
	EKSHA256        string    `json:"ek_sha256"`
	AgentID         string    `json:"agent_id"`
	Nodes           []string  `json:"nodes"` // policy node blocks matched at the last attestation
	TPMManufacturer string    `json:"tpm_manufacturer,omitempty"`
	FirstAttested   time.Time `json:"first_attested"`
	LastAttested    time.Time `json:"last_attested"`
	AgentVersion    string    `json:"agent_version,omitempty"`
	Connected       bool      `json:"connected"` // an open Sync stream now; never true in the file
	// Replica is the tier replica the agent syncs with (a tier only).
	Replica string      `json:"replica,omitempty"`
	Revoked *Revocation `json:"revoked,omitempty"`
}

// Revocation is why and when a node was revoked, and by whom.
type Revocation struct {
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	ByUID  uint32    `json:"by_uid"`
}

type nodesFile struct {
	Nodes []NodeInfo `json:"nodes"`
}

// loadNodes reads the registry in dir; a missing file is an empty one.
func loadNodes(dir string) (map[string]*NodeInfo, error) {
	out := make(map[string]*NodeInfo)
	b, path, err := readState(dir, NodesStateFile)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrBadNodesState, path, err)
	}
	if b == nil {
		return out, nil
	}
	var f nodesFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrBadNodesState, path, err)
	}
	for i := range f.Nodes {
		n := f.Nodes[i]
		if !isEKHash(n.EKSHA256) {
			return nil, fmt.Errorf("%w %s: node %d: ek_sha256 %q is not 64 lowercase hex digits", ErrBadNodesState, path, i+1, n.EKSHA256)
		}
		n.Connected = false
		out[n.EKSHA256] = &n
	}
	return out, nil
}

// nodesLocked is the registry, sorted by EK hash, with Connected filled in.
func (s *Signer) nodesLocked() []NodeInfo {
	out := make([]NodeInfo, 0, len(s.nodes))
	for _, n := range s.nodes {
		c := *n
		c.Nodes = slices.Clone(n.Nodes)
		if n.Revoked != nil {
			r := *n.Revoked
			c.Revoked = &r
		}
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b NodeInfo) int { return strings.Compare(a.EKSHA256, b.EKSHA256) })
	return out
}

// Nodes returns the registry: every agent seen, connected now or not.
func (s *Signer) Nodes() []NodeInfo {
	s.mu.Lock()
	out := s.nodesLocked()
	s.mu.Unlock()
	var alive map[string]store.AliveRecord
	if s.tier != nil {
		alive = s.tier.snapshot().Alive
	}
	for i := range out {
		id, err := spiffeid.FromString(out[i].AgentID)
		here := err == nil && s.syncs.count(id) > 0
		switch {
		case s.tier == nil:
			out[i].Connected = here
		case here:
			out[i].Connected, out[i].Replica = true, s.tier.name
		default:
			// Connected to another replica while that one is alive; a
			// record naming this replica without a stream here is stale.
			r := out[i].Replica
			_, up := alive[r]
			out[i].Connected = up && r != s.tier.name
			if !out[i].Connected {
				out[i].Replica = ""
			}
		}
	}
	return out
}

// saveNodes writes the registry to state_dir. saveMu orders the writes, so
// an older snapshot never overwrites a newer one.
func (s *Signer) saveNodes() error {
	s.nodesSaveMu.Lock()
	defer s.nodesSaveMu.Unlock()
	s.mu.Lock()
	f := nodesFile{Nodes: s.nodesLocked()}
	s.mu.Unlock()
	for i := range f.Nodes {
		f.Nodes[i].Connected = false
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("save node registry: %w", err)
	}
	if err := writeAtomic(filepath.Join(s.cfg.StateDir, NodesStateFile), append(b, '\n')); err != nil {
		return fmt.Errorf("save node registry: %w", err)
	}
	return nil
}

// markNodesDirty asks saveNodesLoop to write the registry: attestations
// only record times and names, so their writes are coalesced.
func (s *Signer) markNodesDirty() {
	if s.tier != nil {
		return // the registry lives in etcd (queueNodeLocked)
	}
	select {
	case s.nodesDirty <- struct{}{}:
	default:
	}
}

// saveNodesLoop writes the registry whenever an attestation changed it,
// and once more at the end.
func (s *Signer) saveNodesLoop(ctx context.Context) error {
	for {
		select {
		case <-s.nodesDirty:
			if err := s.saveNodes(); err != nil {
				s.log.Error("node registry not saved", "error", err)
			}
		case <-ctx.Done():
			select {
			case <-s.nodesDirty:
				if err := s.saveNodes(); err != nil {
					s.log.Error("node registry not saved", "error", err)
				}
			default:
			}
			return nil
		}
	}
}

// recordAttestLocked enters an accepted attestation in the registry.
func (s *Signer) recordAttestLocked(n *node.Node, id spiffeid.ID, version string, now time.Time) {
	rec, ok := s.nodes[n.EKSHA256]
	if !ok {
		rec = &NodeInfo{EKSHA256: n.EKSHA256, FirstAttested: now}
		s.nodes[n.EKSHA256] = rec
	}
	rec.AgentID = id.String()
	rec.Nodes = slices.Clone(n.Names)
	rec.LastAttested = now
	if n.Manufacturer != "" {
		rec.TPMManufacturer = n.Manufacturer
	}
	rec.AgentVersion = version
	if s.tier != nil {
		s.queueNodeLocked(rec)
	}
}

// agentVersion is the version an agent sent in its request metadata,
// bounded and printable, or "".
func agentVersion(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(signerpb.AgentVersionHeader)
	if len(v) == 0 || len(v[0]) > 64 || !utf8.ValidString(v[0]) || strings.IndexFunc(v[0], unicode.IsControl) >= 0 {
		return ""
	}
	return v[0]
}

// revokedLocked returns the revocation of the node with EK hash ek, if any.
func (s *Signer) revokedLocked(ek string) *Revocation {
	if n, ok := s.nodes[ek]; ok {
		return n.Revoked
	}
	return nil
}

// revokedStatus is the refusal every call of a revoked node gets.
func revokedStatus(r *Revocation) error {
	return status.Error(codes.PermissionDenied, signerpb.RevokedPrefix+r.Reason)
}

// refuseRevoked writes the audit line of a refused call of a revoked
// node, rate-limited like the other refusals.
func (s *Signer) refuseRevoked(method, ek string, r *Revocation) error {
	s.metrics.revokedRefusals.WithLabelValues(method).Inc()
	s.warnLimited("call refused: node revoked", ek+"\x00"+method, "method", method, "ek_sha256", ek,
		"agent", agentIDString(s.cfg.TrustDomain, ek), "reason", r.Reason)
	return revokedStatus(r)
}

func agentIDString(td spiffeid.TrustDomain, ek string) string {
	id, err := spiffeid.FromPath(td, agentPath+ek)
	if err != nil {
		return ""
	}
	return id.String()
}

func isEKHash(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// resolveNode turns an EK SHA-256 or an agent SPIFFE ID into an EK hash.
func (s *Signer) resolveNode(name string) (string, error) {
	if isEKHash(strings.ToLower(name)) {
		return strings.ToLower(name), nil
	}
	id, err := spiffeid.FromString(name)
	if err != nil || id.TrustDomain() != s.cfg.TrustDomain || !strings.HasPrefix(id.Path(), agentPath) {
		return "", fmt.Errorf("%q: %w of trust domain %s", name, ErrBadNodeName, s.cfg.TrustDomain)
	}
	ek := strings.TrimPrefix(id.Path(), agentPath)
	if !isEKHash(ek) {
		return "", fmt.Errorf("%q: %w of trust domain %s", name, ErrBadNodeName, s.cfg.TrustDomain)
	}
	return ek, nil
}

// checkReason refuses an empty, oversized, non-UTF-8 or control-character
// revocation reason: it goes into logs and into the agents' errors.
func checkReason(r string) error {
	switch {
	case strings.TrimSpace(r) == "":
		return fmt.Errorf("%w: empty (say why, e.g. --reason \"host decommissioned\")", ErrBadReason)
	case len(r) > maxReasonBytes:
		return fmt.Errorf("%w: %d bytes (limit %d)", ErrBadReason, len(r), maxReasonBytes)
	case !utf8.ValidString(r):
		return fmt.Errorf("%w: not valid UTF-8", ErrBadReason)
	}
	if j := strings.IndexFunc(r, unicode.IsControl); j >= 0 {
		c, _ := utf8.DecodeRuneInString(r[j:])
		return fmt.Errorf("%w: control character %U at byte %d", ErrBadReason, c, j)
	}
	return nil
}

// Revoke revokes the node named by an EK SHA-256 or agent SPIFFE ID: it
// is persisted first, then the agent's Sync streams end at once and every
// later call of it is refused. byUID is the admin caller, for the audit
// line. Bad input returns an error and changes nothing.
func (s *Signer) Revoke(name, reason string, byUID uint32) (NodeInfo, error) {
	if err := checkReason(reason); err != nil {
		return NodeInfo{}, err
	}
	ek, err := s.resolveNode(name)
	if err != nil {
		return NodeInfo{}, err
	}
	s.mu.Lock()
	n, ok := s.nodes[ek]
	switch {
	case !ok:
		s.mu.Unlock()
		return NodeInfo{}, fmt.Errorf("%s: %w", name, ErrUnknownNode)
	case n.Revoked != nil:
		r := n.Revoked.Reason
		s.mu.Unlock()
		return NodeInfo{}, fmt.Errorf("%s: %w (reason: %s): unrevoke it first to change the reason", name, ErrAlreadyRevoked, r)
	}
	n.Revoked = &Revocation{Reason: reason, At: time.Now().UTC(), ByUID: byUID}
	s.mu.Unlock()
	if err := s.persistRevoke(ek, *n.Revoked); err != nil {
		s.mu.Lock()
		n.Revoked = nil
		s.mu.Unlock()
		return NodeInfo{}, fmt.Errorf("revoke %s: %w", name, err)
	}
	// The agent ID follows from the EK: the registry's copy may be
	// rewritten meanwhile by the tier's watch.
	id, _ := spiffeid.FromString(agentIDString(s.cfg.TrustDomain, ek))
	s.mu.Lock()
	// Nothing of the agent is served any more: its calls are refused
	// before they look at it, and a re-attestation is refused too.
	delete(s.agents, id)
	info := *n
	s.mu.Unlock()
	ended := s.syncs.closeAgent(id, ErrNodeRevoked)
	s.log.Warn("node revoked", "ek_sha256", ek, "agent", info.AgentID, "reason", reason, "by_uid", byUID, "sync_streams_ended", ended)
	return info, nil
}

// Unrevoke lifts the revocation of a node; the agent attests again by
// itself (its retry loop) and is served.
func (s *Signer) Unrevoke(name string, byUID uint32) (NodeInfo, error) {
	ek, err := s.resolveNode(name)
	if err != nil {
		return NodeInfo{}, err
	}
	s.mu.Lock()
	n, ok := s.nodes[ek]
	var old *Revocation
	switch {
	case !ok:
		err = fmt.Errorf("%s: %w", name, ErrUnknownNode)
	case n.Revoked == nil:
		err = fmt.Errorf("%s: %w", name, ErrNotRevoked)
	default:
		old, n.Revoked = n.Revoked, nil
	}
	s.mu.Unlock()
	if err != nil {
		return NodeInfo{}, err
	}
	if err := s.persistUnrevoke(ek); err != nil {
		s.mu.Lock()
		n.Revoked = old
		s.mu.Unlock()
		return NodeInfo{}, fmt.Errorf("unrevoke %s: %w", name, err)
	}
	s.mu.Lock()
	info := *n
	s.mu.Unlock()
	s.log.Warn("node unrevoked", "ek_sha256", ek, "agent", info.AgentID, "reason", old.Reason, "by_uid", byUID)
	return info, nil
}

// ErrEtcdUnavailable refuses a change the tier must share (node revoke,
// policy apply) while etcd cannot take it; nothing changed.
var ErrEtcdUnavailable = errors.New("etcd unavailable: the change was not made (the replicas keep serving; retry when etcd has a quorum)")

// persistRevoke keeps a revocation: in state_dir for a lone signer, in
// etcd for a tier (where every replica carries it out).
func (s *Signer) persistRevoke(ek string, r Revocation) error {
	if s.tier == nil {
		return s.saveNodes()
	}
	err := s.tier.st.Revoke(context.Background(), ek, store.Revocation{Reason: r.Reason, At: r.At, ByUID: r.ByUID, ByReplica: s.tier.name})
	return tierErr(err)
}

// persistUnrevoke is persistRevoke's undo.
func (s *Signer) persistUnrevoke(ek string) error {
	if s.tier == nil {
		return s.saveNodes()
	}
	_, err := s.tier.st.Unrevoke(context.Background(), ek)
	return tierErr(err)
}

// tierErr maps the store's refusals to the signer's.
func tierErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrUnavailable):
		return fmt.Errorf("%w: %v", ErrEtcdUnavailable, err)
	case errors.Is(err, store.ErrExists):
		return fmt.Errorf("%w (through another replica)", ErrAlreadyRevoked)
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("%w (lifted through another replica)", ErrNotRevoked)
	}
	return err
}

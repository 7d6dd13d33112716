package signer

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/lanyard-dev/lanyard/signer/store"
)

// ErrNoTier refuses the tier's commands on a lone signer.
var ErrNoTier = errors.New("this signer has no etcd block: it is not part of a tier")

// maxPolicyBytes bounds an applied policy with its ek_ca files: etcd's
// own request limit is 1.5 MiB.
const maxPolicyBytes = 1 << 20

// PolicyApply is the body of the admin socket's policy apply call: the
// file as the operator wrote it, and the ek_ca files it names.
type PolicyApply struct {
	Filename string            `json:"filename"`
	Source   string            `json:"source"`
	Files    map[string][]byte `json:"files,omitempty"`
}

// PolicyStatus is `lanyard-signer policy show`: the revision in force on
// this replica, and the one etcd holds when they differ.
type PolicyStatus struct {
	Revision  int64     `json:"revision"` // in force here
	Filename  string    `json:"filename,omitempty"`
	AppliedAt time.Time `json:"applied_at,omitzero"`
	AppliedBy string    `json:"applied_by,omitempty"`
	Source    string    `json:"source"`
	// Latest is etcd's revision; Error why it is not in force here.
	Latest int64  `json:"latest"`
	Error  string `json:"error,omitempty"`
}

// ApplyPolicy validates a policy file (the same file:line errors as
// `policy check`) and writes it to etcd as the next revision, which every
// replica then puts in force. It waits, briefly, until this replica has
// it in force. Bad input returns an error and changes nothing.
func (s *Signer) ApplyPolicy(ctx context.Context, req PolicyApply, uid uint32) (PolicyStatus, error) {
	if s.tier == nil {
		return PolicyStatus{}, fmt.Errorf("%w: edit policy_path instead (the signer reloads it)", ErrNoTier)
	}
	size := len(req.Source)
	for _, b := range req.Files {
		size += len(b)
	}
	if size > maxPolicyBytes {
		return PolicyStatus{}, fmt.Errorf("%w: %d bytes with its ek_ca files (limit %d)", ErrBadPolicy, size, maxPolicyBytes)
	}
	if req.Filename == "" || strings.ContainsAny(req.Filename, "\x00\n") {
		return PolicyStatus{}, fmt.Errorf("%w: no file name", ErrBadPolicy)
	}
	p, err := policy.ParseFiles([]byte(req.Source), req.Filename, s.cfg.TrustDomain, req.Files)
	if err != nil {
		return PolicyStatus{}, fmt.Errorf("%w: %w", ErrBadPolicy, err)
	}
	// Only the files the policy names travel with it.
	files := make(map[string][]byte)
	for _, n := range p.Nodes {
		for _, path := range n.EKCA {
			files[path] = req.Files[path]
		}
	}
	if len(files) == 0 {
		files = nil
	}
	rec := store.PolicyRecord{Filename: req.Filename, Source: req.Source, Files: files, AppliedAt: time.Now().UTC(),
		AppliedBy: fmt.Sprintf("%s (uid %d)", s.tier.name, uid)}
	rev, err := s.tier.st.ApplyPolicy(ctx, rec)
	if err != nil {
		return PolicyStatus{}, tierErr(err)
	}
	s.log.Info("policy revision applied", "revision", rev, "by_uid", uid, "nodes", len(p.Nodes), "workloads", len(p.Workloads))
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if st := s.PolicyStatus(); st.Revision >= rev || st.Error != "" {
			return st, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return s.PolicyStatus(), nil
}

// ErrBadPolicy: an applied policy that does not validate.
var ErrBadPolicy = errors.New("invalid policy")

// PolicyStatus is the policy in force on this replica.
func (s *Signer) PolicyStatus() PolicyStatus {
	s.mu.Lock()
	out := PolicyStatus{Source: string(s.policySrc), Filename: s.cfg.PolicyPath}
	s.mu.Unlock()
	if s.tier == nil {
		return out
	}
	t := s.tier
	t.mu.Lock()
	out.Revision, out.Error = t.policyRev, t.policyErr
	st := t.state
	t.mu.Unlock()
	if st.Policy != nil {
		out.Latest = st.Policy.Revision
		if st.Policy.Revision == out.Revision {
			out.Filename, out.AppliedAt, out.AppliedBy = st.Policy.Filename, st.Policy.AppliedAt, st.Policy.AppliedBy
		}
	}
	return out
}

// ReplicaStatus is one replica in `lanyard-signer replica list`.
type ReplicaStatus struct {
	Name      string          `json:"name"`
	Address   string          `json:"address"`
	Alive     bool            `json:"alive"`
	Self      bool            `json:"self,omitempty"`
	Forgotten bool            `json:"forgotten,omitempty"`
	AliveFor  string          `json:"alive_since,omitempty"`
	Updated   time.Time       `json:"updated,omitzero"`
	Version   string          `json:"version,omitempty"`
	Keys      []ReplicaKeyRef `json:"keys"`
	// KeptUntil is when the last of its keys may leave the bundle.
	KeptUntil time.Time `json:"kept_until,omitzero"`
}

// ReplicaKeyRef is one published key of a replica.
type ReplicaKeyRef struct {
	Kind      string    `json:"kind"` // "x509" or "jwt"
	ID        string    `json:"id"`   // CA serial (hex) or JWT kid
	Phase     string    `json:"phase"`
	KeepUntil time.Time `json:"keep_until"`
}

// Replicas lists every replica etcd knows: alive, or down with keys that
// may still vouch for something.
func (s *Signer) Replicas() ([]ReplicaStatus, error) {
	if s.tier == nil {
		return nil, ErrNoTier
	}
	st := s.tier.snapshot()
	byName := make(map[string]*ReplicaStatus)
	get := func(name string) *ReplicaStatus {
		if r, ok := byName[name]; ok {
			return r
		}
		r := &ReplicaStatus{Name: name, Self: name == s.tier.name, Keys: []ReplicaKeyRef{}}
		byName[name] = r
		return r
	}
	for name, rec := range st.Replicas {
		r := get(name)
		r.Address, r.Updated, r.Forgotten = rec.Address, rec.Updated, rec.Forgotten
		for _, k := range rec.Keys {
			ref := ReplicaKeyRef{Kind: "jwt", ID: k.KID, Phase: k.Phase, KeepUntil: k.KeepUntil}
			if k.CertDER != nil {
				ref.Kind = "x509"
				if c, err := x509.ParseCertificate(k.CertDER); err == nil {
					ref.ID = serialHex(c)
				}
			}
			r.Keys = append(r.Keys, ref)
			if k.KeepUntil.After(r.KeptUntil) {
				r.KeptUntil = k.KeepUntil
			}
		}
	}
	for name, a := range st.Alive {
		r := get(name)
		r.Alive, r.AliveFor, r.Version = true, a.Since.UTC().Format(time.RFC3339), a.Version
		if r.Address == "" {
			r.Address = a.Address
		}
	}
	out := make([]ReplicaStatus, 0, len(byName))
	for _, r := range byName {
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b ReplicaStatus) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// ForgetReplica declares a replica that is down gone for good: it leaves
// `replica list` once its keys, kept in the bundle until what they signed
// has expired, have all expired.
func (s *Signer) ForgetReplica(ctx context.Context, name string) error {
	if s.tier == nil {
		return ErrNoTier
	}
	if name == s.tier.name {
		return fmt.Errorf("%w: %q is this replica", ErrReplicaAlive, name)
	}
	err := s.tier.st.Forget(ctx, name)
	switch {
	case errors.Is(err, store.ErrAlive):
		return fmt.Errorf("%w: %q holds its lease: stop it first", ErrReplicaAlive, name)
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("%w: %q", ErrUnknownReplica, name)
	}
	if err := tierErr(err); err != nil {
		return err
	}
	s.log.Warn("replica forgotten", "replica", name)
	return nil
}

// The replica commands' refusals.
var (
	ErrReplicaAlive   = errors.New("replica is alive")
	ErrUnknownReplica = errors.New("no such replica in etcd")
)

// TierStatus is the tier's part of `lanyard-signer status`.
type TierStatus struct {
	Replica        string    `json:"replica"`
	EtcdOK         bool      `json:"etcd_ok"`
	EtcdError      string    `json:"etcd_error,omitempty"`
	EtcdSince      time.Time `json:"etcd_since,omitzero"`
	PolicyRevision int64     `json:"policy_revision"`
	PolicyError    string    `json:"policy_error,omitempty"`
	ReplicasAlive  int       `json:"replicas_alive"`
	ReplicasKnown  int       `json:"replicas_known"`
	// JoiningUntil is when a joining replica starts serving agents.
	JoiningUntil time.Time `json:"joining_until,omitzero"`
}

// Tier is the replica's state in its tier, nil for a lone signer.
func (s *Signer) Tier() *TierStatus { return s.tierStatus() }

// tierStatus is nil for a lone signer.
func (s *Signer) tierStatus() *TierStatus {
	t := s.tier
	if t == nil {
		return nil
	}
	h := t.st.Health()
	t.mu.Lock()
	out := &TierStatus{Replica: t.name, EtcdOK: h.OK, EtcdError: h.LastError, EtcdSince: h.Since,
		PolicyRevision: t.policyRev, PolicyError: t.policyErr, ReplicasAlive: len(t.state.Alive), JoiningUntil: t.joinUntil}
	known := len(t.state.Replicas)
	for name := range t.state.Alive {
		if _, ok := t.state.Replicas[name]; !ok {
			known++
		}
	}
	out.ReplicasKnown = known
	t.mu.Unlock()
	return out
}

// tierAdminCode is the HTTP status of the tier's refusals.
func tierAdminCode(err error) (int, bool) {
	switch {
	case errors.Is(err, ErrEtcdUnavailable):
		return http.StatusServiceUnavailable, true
	case errors.Is(err, ErrBadPolicy):
		return http.StatusBadRequest, true
	case errors.Is(err, ErrNoTier), errors.Is(err, ErrReplicaAlive):
		return http.StatusConflict, true
	case errors.Is(err, ErrUnknownReplica):
		return http.StatusNotFound, true
	}
	return 0, false
}

package signer

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

const (
	// attestTimeout bounds one whole attestation, challenge round trip
	// included, so a stalled client cannot hold signer resources.
	attestTimeout = 30 * time.Second
	// maxCSRs bounds one SignX509SVIDs call.
	maxCSRs = 1000
	// agentPath is the path prefix of every agent SVID.
	agentPath = "/lanyard/agent/tpm/"
)

// api implements the agent-facing gRPC service. gRPC status codes are
// chosen here and nowhere else.
type api struct {
	signerpb.UnimplementedSignerServer
	s *Signer
}

// errLeftPolicy refuses a TPM whose node rules were removed while it
// answered the challenge.
var errLeftPolicy = errors.New("TPM left the policy during attestation")

func (a *api) Attest(stream signerpb.Signer_AttestServer) (err error) {
	s := a.s
	// Every Attest stream is unauthenticated until it succeeds: it takes
	// a slot of the gate before anything else, so a flood of streams
	// costs the signer a bounded number of handlers.
	addr := peerIP(stream.Context())
	if err := s.gate.enter(addr); err != nil {
		limit := limitPending
		if errors.Is(err, ErrTooManyFromAddress) {
			limit = limitPendingPerAddress
		}
		s.metrics.limitRefusals.WithLabelValues(limit).Inc()
		s.warnLimited("attestation refused: limit reached", addr, "peer", addr, "limit", limit)
		return status.Error(codes.ResourceExhausted, "attest: "+err.Error())
	}
	defer s.gate.leave(addr)
	ctx, cancel := context.WithTimeout(stream.Context(), attestTimeout)
	defer cancel()
	start := time.Now()
	var refusal error // why the verifier said no, when it did
	defer func() {
		result := attestResult(refusal)
		if refusal == nil && err != nil {
			result = "error" // the stream broke or timed out
		}
		s.metrics.attestations.WithLabelValues(result).Inc()
		if result == "ok" {
			s.metrics.attestDuration.Observe(time.Since(start).Seconds())
		}
	}()

	req, err := s.recvEvidence(ctx, stream, addr)
	if err != nil {
		return err
	}
	pe := req.GetEvidence()
	if pe == nil {
		refusal = node.ErrMalformedEvidence
		return status.Error(codes.InvalidArgument, "attest: the first message must carry evidence")
	}
	ev := &node.Evidence{
		EKCertificate: pe.GetEkCertificate(),
		EKPublic:      pe.GetEkPublic(),
		AK: attest.AttestationParameters{
			Public: pe.GetAk().GetPublic(), CreateData: pe.GetAk().GetCreateData(),
			CreateAttestation: pe.GetAk().GetCreateAttestation(), CreateSignature: pe.GetAk().GetCreateSignature(),
		},
		Key: attest.CertificationParameters{
			Public: pe.GetKey().GetPublic(), CreateData: pe.GetKey().GetCreateData(),
			CreateAttestation: pe.GetKey().GetCreateAttestation(), CreateSignature: pe.GetKey().GetCreateSignature(),
		},
		CSR: pe.GetCsr(),
	}
	// A revoked node is refused as soon as its EK is known, before the
	// challenge costs either side anything.
	s.mu.Lock()
	rules := s.rules
	rev := s.revokedLocked(ev.EKSHA256())
	s.mu.Unlock()
	if rev != nil {
		refusal = ErrNodeRevoked
		return s.refuseRevoked("Attest", ev.EKSHA256(), rev)
	}
	ch, err := node.NewChallenge(ev, rules, nil, time.Now())
	if err != nil {
		refusal = err
		s.logRefusal(ctx, addr, ev.EKSHA256(), err, start)
		return attestStatus(err)
	}
	cred := ch.Credential()
	if err := stream.Send(&signerpb.AttestResponse{Step: &signerpb.AttestResponse_Challenge{
		Challenge: &signerpb.Challenge{Credential: cred.Credential, Secret: cred.Secret},
	}}); err != nil {
		return err
	}
	req, err = recv(ctx, stream)
	if err != nil {
		return err
	}
	accepted, err := ch.Verify(req.GetActivationSecret())
	if err != nil {
		refusal = err
		s.logRefusal(ctx, addr, ev.EKSHA256(), err, start)
		return attestStatus(err)
	}

	id, err := spiffeid.FromPath(s.cfg.TrustDomain, agentPath+accepted.EKSHA256)
	if err != nil {
		return status.Errorf(codes.Internal, "attest: agent ID: %v", err)
	}
	now := time.Now()
	s.mu.Lock()
	// The policy may have changed while the TPM answered: match again
	// under the lock that policy changes take, so a TPM just removed from
	// policy cannot slip in between.
	accepted.Names = accepted.Rematch(s.rules, now)
	if len(accepted.Names) == 0 {
		s.mu.Unlock()
		refusal = errLeftPolicy
		s.logRefusal(ctx, addr, accepted.EKSHA256, errLeftPolicy, start)
		return status.Error(codes.PermissionDenied, "attestation refused: the TPM left the policy during attestation")
	}
	// Revoked while the TPM answered: refused like one revoked before.
	if rev := s.revokedLocked(accepted.EKSHA256); rev != nil {
		s.mu.Unlock()
		refusal = ErrNodeRevoked
		return s.refuseRevoked("Attest", accepted.EKSHA256, rev)
	}
	cert, err := s.auth.sign(accepted.CSR.PublicKey, id, s.cfg.AgentTTL, nil, now)
	if err == nil {
		s.agents[id] = &agentRecord{node: accepted, names: accepted.Names, notAfter: cert.NotAfter}
		s.recordAttestLocked(accepted, id, agentVersion(ctx), now)
	}
	bundle := s.bundleMessageLocked()
	s.mu.Unlock()
	if err != nil {
		return status.Errorf(codes.Internal, "attest: %v", err)
	}
	s.markNodesDirty()
	s.log.Info("agent attested", "ek_sha256", accepted.EKSHA256, "spiffe_id", id.String(), "nodes", accepted.Names,
		"serial", serialHex(cert), "not_after", cert.NotAfter.UTC().Format(time.RFC3339), "duration_ms", time.Since(start).Milliseconds())
	return stream.Send(&signerpb.AttestResponse{Step: &signerpb.AttestResponse_Result{Result: &signerpb.AttestResult{
		Svid:          [][]byte{cert.Raw},
		Bundle:        bundle,
		NodeSelectors: accepted.Selectors(),
	}}})
}

// recv is stream.Recv bounded by ctx: returning from the handler cancels
// the stream, which ends the pending Recv.
func recv(ctx context.Context, stream signerpb.Signer_AttestServer) (*signerpb.AttestRequest, error) {
	type result struct {
		req *signerpb.AttestRequest
		err error
	}
	ch := make(chan result, 1)
	go func() {
		req, err := stream.Recv()
		ch <- result{req, err}
	}()
	select {
	case r := <-ch:
		return r.req, r.err
	case <-ctx.Done():
		return nil, status.Error(codes.DeadlineExceeded, "attest: timed out waiting for the agent")
	}
}

// recvEvidence waits for an Attest stream's first message, the evidence,
// for attest_first_message_timeout at most: an agent sends it right after
// its handshake, and a stream that sends nothing only holds a slot.
func (s *Signer) recvEvidence(ctx context.Context, stream signerpb.Signer_AttestServer, addr string) (*signerpb.AttestRequest, error) {
	d := s.cfg.Limits.AttestFirstMessageTimeout
	fctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	req, err := recv(fctx, stream)
	if err != nil && ctx.Err() == nil && fctx.Err() != nil {
		s.metrics.limitRefusals.WithLabelValues(limitFirstMessage).Inc()
		s.warnLimited("attestation refused: no evidence in time", addr, "peer", addr, "limit", limitFirstMessage, "timeout", d.String())
		return nil, status.Errorf(codes.DeadlineExceeded, "attest: no evidence within %s (limits.attest_first_message_timeout)", d)
	}
	return req, err
}

// logRefusal writes the audit line of an attestation the verifier or
// policy refused, rate-limited per source address like every refusal a
// client can provoke: the peer, the EK hash (so an operator can pin it),
// the reason and how long the attempt took.
func (s *Signer) logRefusal(ctx context.Context, addr, ekSHA256 string, reason error, start time.Time) {
	s.warnLimited("attestation refused", addr, "peer", peerAddr(ctx), "ek_sha256", ekSHA256, "reason", reason.Error(),
		"duration_ms", time.Since(start).Milliseconds())
}

// attestStatus maps an attestation refusal to its gRPC code. The error
// texts name the failed check and never carry a secret.
func attestStatus(err error) error {
	if errors.Is(err, node.ErrMalformedEvidence) {
		return status.Error(codes.InvalidArgument, "attestation refused: "+err.Error())
	}
	return status.Error(codes.PermissionDenied, "attestation refused: "+err.Error())
}

func (a *api) Sync(_ *signerpb.SyncRequest, stream signerpb.Signer_SyncServer) error {
	s := a.s
	ctx := stream.Context()
	id, err := s.authenticate(ctx, "Sync")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	evicted, release := s.syncs.open(id, cancel)
	defer release()
	if evicted > 0 {
		s.metrics.limitRefusals.WithLabelValues(limitSyncStreams).Add(float64(evicted))
		s.warnLimited("sync stream replaced: limit reached", id.String(), "agent", id.String(), "limit", limitSyncStreams,
			"ended", evicted, "max", s.cfg.Limits.MaxSyncStreamsPerAgent)
	}
	s.noteSyncOpen(id)
	s.log.Debug("sync stream opened", "agent", id.String())
	s.metrics.syncStreams.Inc()
	defer s.metrics.syncStreams.Dec()
	var last *signerpb.SyncResponse
	for {
		resp, changed, err := s.syncState(id)
		if err != nil {
			return err
		}
		if !proto.Equal(resp, last) {
			if err := stream.Send(resp); err != nil {
				return err
			}
			last = resp
		}
		select {
		case <-changed:
		case <-s.stopping:
			return status.Error(codes.Unavailable, "sync: the signer is shutting down")
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), ErrNodeRevoked) {
				s.mu.Lock()
				rev := s.revokedLocked(strings.TrimPrefix(id.Path(), agentPath))
				s.mu.Unlock()
				if rev != nil {
					s.log.Info("sync stream closed: node revoked", "agent", id.String())
					return revokedStatus(rev)
				}
			}
			if errors.Is(context.Cause(ctx), ErrSyncReplaced) {
				return status.Errorf(codes.Aborted, "sync: %v: at most %d per agent", ErrSyncReplaced, s.cfg.Limits.MaxSyncStreamsPerAgent)
			}
			return nil
		}
	}
}

// syncState is what agent id may serve now, and a channel closed when
// that may change.
func (s *Signer) syncState(id spiffeid.ID) (*signerpb.SyncResponse, <-chan struct{}, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Revoked between authenticate and the stream's registration: the
	// revocation found no stream to close, so this ends it.
	if rev := s.revokedLocked(strings.TrimPrefix(id.Path(), agentPath)); rev != nil {
		return nil, nil, revokedStatus(rev)
	}
	rec, ok := s.agents[id]
	if !ok {
		return nil, nil, status.Error(codes.Unauthenticated, "agent is not attested with this signer (restarted, or its TPM left the policy): attest again")
	}
	resp := &signerpb.SyncResponse{Bundle: s.bundleMessageLocked()}
	for _, w := range s.pol.WorkloadsForNodes(rec.names) {
		resp.Entries = append(resp.Entries, entryMessage(w))
	}
	resp.FederatedBundles = s.federatedBundlesLocked(resp.Entries)
	resp.TokenRevocations = s.tokenRevMsgs
	return resp, s.changed, nil
}

func (a *api) SignX509SVIDs(ctx context.Context, req *signerpb.SignX509SVIDsRequest) (*signerpb.SignX509SVIDsResponse, error) {
	s := a.s
	id, err := s.authenticate(ctx, "SignX509SVIDs")
	if err != nil {
		return nil, err
	}
	if n := len(req.GetCsrs()); n > maxCSRs {
		s.metrics.svidRefusals.WithLabelValues(refusedTooMany).Add(float64(n))
		s.log.Warn("x509-svids refused", "agent", id.String(), "csrs", n, "reason", "too many CSRs in one call")
		return nil, status.Errorf(codes.InvalidArgument, "too many CSRs in one call: %d (limit %d)", n, maxCSRs)
	}
	resp := &signerpb.SignX509SVIDsResponse{}
	now := time.Now()
	for _, c := range req.GetCsrs() {
		out := &signerpb.SignedX509SVID{EntryId: c.GetEntryId()}
		cert, w, rev, err := s.signOne(id, c, now)
		if err != nil {
			out.Error = err.Error()
			s.metrics.svidRefusals.WithLabelValues(refusalReason(err)).Inc()
			spiffeID := "" // unknown when the entry is not this node's
			if w != nil {
				spiffeID = w.SPIFFEID.String()
			}
			s.log.Warn("x509-svid refused", "agent", id.String(), "entry", c.GetEntryId(), "spiffe_id", spiffeID, "reason", err.Error())
		} else {
			out.Chain, out.Revision = [][]byte{cert.Raw}, rev
			s.metrics.svidsSigned.Inc()
			s.log.Info("x509-svid signed", "agent", id.String(), "entry", w.Name, "spiffe_id", w.SPIFFEID.String(),
				"serial", serialHex(cert), "not_after", cert.NotAfter.UTC().Format(time.RFC3339))
		}
		resp.Svids = append(resp.Svids, out)
	}
	return resp, nil
}

// ErrEntryNotAuthorized is returned for a CSR naming an entry the calling
// node may not serve.
var ErrEntryNotAuthorized = errors.New("entry is not authorized for this node")

// ErrEntryChanged refuses a CSR made for an entry revision that is no
// longer the policy's: the agent has not synced the change yet. Signing it
// anyway would hand the agent an SVID of the new revision that it would
// serve by the old revision's selectors.
var ErrEntryChanged = errors.New("entry changed since the agent synced it")

// errNotAttested refuses a CSR from an agent the signer does not know.
var errNotAttested = errors.New("agent is not attested with this signer")

// badCSRError refuses a CSR that does not parse or whose signature fails.
type badCSRError struct{ error }

func (e badCSRError) Unwrap() error { return e.error }

// refusalReason names a signOne error for svid_refusals_total.
func refusalReason(err error) string {
	switch {
	case errors.Is(err, errNotAttested):
		return refusedNotAttested
	case errors.Is(err, ErrEntryNotAuthorized):
		return refusedNotAuthorized
	case errors.Is(err, ErrEntryChanged):
		return refusedEntryChanged
	case errors.As(err, new(badCSRError)):
		return refusedBadCSR
	}
	return refusedSignError
}

// signOne signs one CSR for agent and returns the entry revision it signed
// for. The workload is returned whenever the entry is one the agent may
// serve, even on refusal, for the audit line. A CSR that names a revision
// (every current agent does) must name the policy's current one; revision 0
// is an older agent's, which checks the certificate's SPIFFE ID instead.
func (s *Signer) signOne(agent spiffeid.ID, c *signerpb.CSR, now time.Time) (*x509.Certificate, *policy.Workload, uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, ok := s.agents[agent]
	if !ok {
		return nil, nil, 0, errNotAttested
	}
	allowed := s.pol.WorkloadsForNodes(rec.names)
	i := slices.IndexFunc(allowed, func(w policy.Workload) bool { return w.Name == c.GetEntryId() })
	if i < 0 {
		return nil, nil, 0, fmt.Errorf("entry %q: %w", c.GetEntryId(), ErrEntryNotAuthorized)
	}
	w := allowed[i]
	rev := entryMessage(w).GetRevision()
	if c.GetRevision() != 0 && c.GetRevision() != rev {
		return nil, &w, 0, fmt.Errorf("entry %q: revision %x, policy has %x: %w", w.Name, c.GetRevision(), rev, ErrEntryChanged)
	}
	csr, err := x509.ParseCertificateRequest(c.GetCsr())
	if err != nil {
		return nil, &w, 0, badCSRError{fmt.Errorf("entry %q: parse CSR: %w", w.Name, err)}
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, &w, 0, badCSRError{fmt.Errorf("entry %q: CSR signature: %w", w.Name, err)}
	}
	ttl := min(w.X509TTL, s.cfg.X509MaxTTL)
	cert, err := s.auth.sign(csr.PublicKey, w.SPIFFEID, ttl, w.DNSNames, now)
	if err != nil {
		return nil, &w, 0, err
	}
	return cert, &w, rev, nil
}

// authenticate returns the agent on the other end of ctx's connection: the
// TLS layer verified its chain against the bundle; here we check that it
// is an agent SVID, still valid, of an agent this signer attested and has
// not revoked: checked on every call, so a revoked agent's SVID, valid
// until it expires, opens nothing. method names the call for the audit
// line of a refusal.
func (s *Signer) authenticate(ctx context.Context, method string) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "an agent SVID is required: attest first")
	}
	leaf := ti.State.PeerCertificates[0]
	if time.Now().After(leaf.NotAfter) {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "agent SVID expired: attest again")
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || !strings.HasPrefix(id.Path(), agentPath) {
		return spiffeid.ID{}, status.Error(codes.PermissionDenied, "caller is not an agent")
	}
	ek := strings.TrimPrefix(id.Path(), agentPath)
	s.mu.Lock()
	_, known := s.agents[id]
	rev := s.revokedLocked(ek)
	s.mu.Unlock()
	if rev != nil {
		return spiffeid.ID{}, s.refuseRevoked(method, ek, rev)
	}
	if !known {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "agent is not attested with this signer (restarted, or its TPM left the policy): attest again")
	}
	return id, nil
}

// bundleMessageLocked is the bundle agents are sent now: the one on disk.
func (s *Signer) bundleMessageLocked() *signerpb.Bundle { return s.agentBundle }

// bundleMessage builds the agents' bundle message of sequence s.bundleN
// (read under s.mu, or before the signer is shared).
func (s *Signer) bundleMessage(cas []*x509.Certificate, keys []publicJWTKey) *signerpb.Bundle {
	b := &signerpb.Bundle{TrustDomain: s.cfg.TrustDomain.String(), Sequence: s.bundleN}
	for _, c := range cas {
		b.X509Authorities = append(b.X509Authorities, c.Raw)
	}
	b.JwtAuthorities = jwtAuthorities(keys)
	return b
}

func entryMessage(w policy.Workload) *signerpb.Entry {
	e := &signerpb.Entry{
		Id:             w.Name,
		SpiffeId:       w.SPIFFEID.String(),
		Selectors:      w.Selectors,
		X509TtlSeconds: int64(w.X509TTL / time.Second),
		JwtTtlSeconds:  int64(w.JWTTTL / time.Second),
		DnsNames:       w.DNSNames,
		Hint:           w.Hint,
	}
	for _, td := range w.FederatesWith {
		e.FederatesWith = append(e.FederatesWith, td.Name())
	}
	if a := w.Actions; a != nil {
		e.Actions = &signerpb.ActionPolicy{TtlSeconds: int64(a.TTL / time.Second), Names: a.Names}
	}
	// The revision lets an agent tell "same entry" from "changed entry"
	// (and so re-sign) without comparing fields itself.
	h := fnv.New64a()
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(e)
	h.Write(b)
	e.Revision = h.Sum64()
	return e
}

func serialHex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// peerIP is the source IP of ctx's connection, the key of the per-address
// limits: a peer's port changes with every connection, its IP does not.
func peerIP(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if ta, ok := p.Addr.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return host
	}
	return p.Addr.String()
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// signerLink is what the upstream's loops need of the connection to the
// signer. signerConn is the real one (gRPC over mTLS, the key in the
// TPM); the loops' tests run under synctest on an in-memory one, since
// neither the network nor the cgo TPM simulator can join a bubble.
type signerLink interface {
	// attest proves the TPM and installs the new identity and
	// connection; on failure the previous one stays.
	attest(ctx context.Context) (*signerpb.AttestResult, *x509svid.SVID, error)
	// sync opens the sync stream on the current connection; replaced is
	// closed once that connection is replaced. errNotConnected before
	// the first attestation.
	sync(ctx context.Context) (recv func() (*signerpb.SyncResponse, error), replaced <-chan struct{}, err error)
	mintJWTSVIDs(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error)
	// replaced returns a channel closed once the current connection is
	// replaced by a new attestation.
	replaced() <-chan struct{}
	// becameReady returns a channel closed when the current connection,
	// down now, comes up (nil when there is none or it is up).
	becameReady(ctx context.Context) <-chan struct{}
	// resetBackoff makes a connection waiting out its reconnect backoff
	// try again now.
	resetBackoff()
}

// upstreamSink is where what the signer sends goes, checked and
// converted: the parts that serve it.
type upstreamSink interface {
	// attested says a new identity is in place: work that failed on the
	// old one can go ahead.
	attested()
	setBundle(cas []*x509.Certificate, b *signerpb.Bundle) error
	// setFederated replaces the federated bundles (federation.go):
	// refused are the domains whose bundle this message got wrong.
	setFederated(good []*fedBundle, refused []spiffeid.TrustDomain)
	setEntries(entries []*entry)
	// setRevocations replaces the token revocations in force.
	setRevocations(revs []workloadapi.Revocation)
}

// upstream keeps the agent attested and synced: it attests at start
// (retrying until the signer answers), again at half the agent SVID's
// lifetime or at once when the signer no longer knows the agent, and
// holds the sync stream open, reconnecting with backoff. It also follows
// the trust bundle file, the operator's way to name a signer the agent
// cannot know otherwise.
type upstream struct {
	link      signerLink
	sink      upstreamSink
	td        spiffeid.TrustDomain
	replicas  *replicaSet        // the signer replicas, and which one is in use
	trust     *x509bundle.Bundle // what the signer is verified against, shared with the link
	trustPath string
	loaded    []byte // the trust file's content at start
	sched     rotator.Schedule
	backoff   rotator.Backoff
	rand      func() float64 // backoff jitter in [0, 1)
	jitter    func() float64 // renewal jitter in [-1, 1]
	log       hclog.Logger
	metrics   *metrics
	// reattestWait bounds how long a JWT-SVID call that found this agent
	// unknown to the signer waits for the new attestation it triggers.
	reattestWait time.Duration

	reattest  chan struct{} // the signer no longer knows us, or the TPM is back: attest again
	trustWake broadcast     // the trust file brought a new authority, or a call got through: retry now

	mu   sync.Mutex
	snap upstreamSnapshot
}

// upstreamSnapshot is the upstream's state for the status report.
type upstreamSnapshot struct {
	AgentID       spiffeid.ID // zero before the first attestation
	EKSHA256      string
	AgentNotAfter time.Time
	AgentRenewAt  time.Time // next attestation
	NodeSelectors []string
	LastSync      time.Time // last message on the sync stream; zero if none yet
	SyncConnected bool      // the sync stream is open and has delivered a message
	SyncSince     time.Time // when SyncConnected last changed; zero if it never has
	// AttestRefused is the signer's reason when it refused the last
	// attestation on its merits (an unknown or untrusted TPM, a bad
	// proof), as opposed to being unreachable; "" otherwise.
	AttestRefused  string
	SyncFailures   int // consecutive broken sync streams
	AttestFailures int // consecutive failed attestations
	// Revoked is the signer's reason when it refused this node as
	// revoked, until an attestation or a sync gets through again.
	Revoked string
}

// jwtReattestWait is upstream.reattestWait: one attestation takes well
// under a second against swtpm and a few seconds on a slow hardware TPM,
// and the caller is waiting.
const jwtReattestWait = 10 * time.Second

// Snapshot returns the upstream's state.
func (u *upstream) Snapshot() upstreamSnapshot {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := u.snap
	s.NodeSelectors = slices.Clone(s.NodeSelectors)
	return s
}

func (u *upstream) update(f func(*upstreamSnapshot)) {
	u.mu.Lock()
	defer u.mu.Unlock()
	f(&u.snap)
}

// Run attests, syncs and follows the trust file until ctx ends.
func (u *upstream) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return u.attestLoop(ctx) })
	g.Go(func() error { return u.syncLoop(ctx) })
	g.Go(func() error { return u.watchTrust(ctx) })
	return g.Wait()
}

// attestLoop attests at start (retrying until the signer answers), then
// again at half the agent SVID's lifetime, or at once when asked.
func (u *upstream) attestLoop(ctx context.Context) error {
	failures := 0
	for {
		trustChanged := u.trustWake.C()
		u.reloadTrust()
		start := time.Now()
		res, svid, err := u.link.attest(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			u.metrics.attestFailures.Inc()
			failures++
			u.update(func(s *upstreamSnapshot) { s.AttestFailures, s.AttestRefused = failures, refusal(err) })
			u.checkRevoked(err)
			d := u.backoff.Delay(failures, u.rand())
			u.log.Error("attestation failed", "signer", u.replicas.address(), "error", err, "failures", failures, "retry_in", d.String())
			if !u.waitRetry(ctx, d, trustChanged, nil, u.reattest) {
				return nil
			}
			continue
		}
		if failures > 0 {
			u.retryNow()
		}
		u.metrics.attestDuration.Observe(time.Since(start).Seconds())
		failures = 0
		u.sink.attested()
		if err := u.applyBundle(res.GetBundle()); err != nil {
			u.log.Error("bad bundle from signer", "error", err)
		}
		leaf := svid.Certificates[0]
		u.log.Info("agent attested", "spiffe_id", svid.ID.String(), "serial", leaf.SerialNumber.Text(16),
			"not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "node_selectors", res.GetNodeSelectors())
		// Scheduled from now, not the backdated NotBefore (see svid.received).
		renew := u.sched.RenewAt(time.Now(), leaf.NotAfter, u.jitter())
		u.update(func(s *upstreamSnapshot) {
			s.AttestFailures, s.Revoked, s.AttestRefused = 0, "", ""
			s.AgentID, s.AgentNotAfter, s.AgentRenewAt = svid.ID, leaf.NotAfter, renew
			s.EKSHA256 = strings.TrimPrefix(svid.ID.Path(), agentPathPrefix)
			s.NodeSelectors = res.GetNodeSelectors()
		})
		t := time.NewTimer(time.Until(renew))
		select {
		case <-t.C:
		case <-u.reattest:
			t.Stop()
		case <-ctx.Done():
			t.Stop()
			return nil
		}
	}
}

// syncLoop holds the sync stream open on the current connection, applying
// every message, and reconnects with backoff when it breaks.
func (u *upstream) syncLoop(ctx context.Context) error {
	failures := 0
	for {
		// The signer may have restarted with a new CA since the last
		// attempt; its bundle file is how the agent learns it.
		trustChanged := u.trustWake.C()
		u.reloadTrust()
		recv, replaced, err := u.link.sync(ctx)
		if errors.Is(err, errNotConnected) {
			select {
			case <-replaced:
				continue
			case <-ctx.Done():
				return nil
			}
		}
		if err == nil {
			err = u.receive(recv, &failures)
		}
		u.update(func(s *upstreamSnapshot) {
			if s.SyncConnected {
				s.SyncConnected, s.SyncSince = false, time.Now()
			}
		})
		if ctx.Err() != nil {
			return nil
		}
		select {
		case <-replaced:
			continue // re-attested: the new connection is ready now
		default:
		}
		u.checkUnauthenticated(err)
		u.checkRevoked(err)
		addr := u.replicas.address()
		if u.replicas.lost(err, time.Now()) {
			// The replica is gone and another can serve: attest there
			// now; the new connection ends the wait below.
			u.log.Warn("signer replica lost; switching to another", "signer", addr, "error", err)
			u.requestReattest()
		}
		u.metrics.syncFailures.Inc()
		failures++
		u.update(func(s *upstreamSnapshot) { s.SyncFailures = failures })
		d := u.backoff.Delay(failures, u.rand())
		u.log.Warn("sync stream broken", "signer", addr, "error", err, "failures", failures, "retry_in", d.String())
		if !u.waitRetry(ctx, d, trustChanged, replaced, nil) {
			return nil
		}
	}
}

// receive applies the messages of one sync stream until it breaks. This is
// the edge where entries become the agent's own (entriesFrom).
func (u *upstream) receive(recv func() (*signerpb.SyncResponse, error), failures *int) error {
	for {
		msg, err := recv()
		if err != nil {
			return err
		}
		if *failures > 0 {
			u.retryNow()
		}
		*failures = 0
		u.replicas.reached()
		u.update(func(s *upstreamSnapshot) {
			now := time.Now()
			if !s.SyncConnected {
				s.SyncSince = now
			}
			s.SyncFailures, s.SyncConnected, s.LastSync, s.Revoked = 0, true, now, ""
		})
		if err := u.applyBundle(msg.GetBundle()); err != nil {
			u.log.Error("bad bundle from signer", "error", err)
			continue
		}
		// Federated bundles first, so that an entry that starts to
		// federate serves the bundle in its very first response.
		u.sink.setFederated(federatedFrom(msg.GetFederatedBundles(), u.td, u.log))
		u.sink.setRevocations(revocationsFrom(msg.GetTokenRevocations(), time.Now(), u.log))
		entries := entriesFrom(msg.GetEntries(), u.td, u.log)
		u.sink.setEntries(entries)
		u.log.Debug("synced", "entries", len(entries), "bundle_sequence", msg.GetBundle().GetSequence(),
			"federated_bundles", len(msg.GetFederatedBundles()))
	}
}

// waitRetry waits out a retry delay d after a failed call to the signer,
// and reports whether ctx is still live. It ends early when waiting longer
// cannot help: the trust file brought a new authority or a call found the
// signer back (retry, a trustWake channel), the connection was replaced
// by a new attestation, the current connection to the signer comes back
// up (gRPC redials in the background, so this is how a signer's return is
// seen within a second without a hint), or, for the attestation loop
// (reattest), a new attestation is asked for (the TPM came back).
func (u *upstream) waitRetry(ctx context.Context, d time.Duration, retry, replaced, reattest <-chan struct{}) bool {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	up := u.link.becameReady(wctx)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-retry:
	case <-replaced:
	case <-up:
	case <-reattest:
	case <-ctx.Done():
		return false
	}
	return true
}

// retryNow tells every loop waiting out a backoff, and gRPC's reconnect
// backoff, that the signer can be reached now (a call got through, or the
// trust file brought the authority a restarted signer is known by), so
// they retry at once rather than after their full delay.
func (u *upstream) retryNow() {
	u.link.resetBackoff()
	u.trustWake.notify()
}

// checkUnauthenticated asks for a new attestation when the signer says it
// does not know this agent (it restarted, or the agent SVID lapsed): the
// agent SVID is the key to everything else, so it must not wait for a
// backoff timer to run out.
func (u *upstream) checkUnauthenticated(err error) {
	if status.Code(err) == codes.Unauthenticated {
		u.requestReattest()
	}
}

// refusal returns the signer's message when err is a refusal of the
// attestation itself (the signer answered, and said no), else "": an
// operator must act on a refusal, while an unreachable signer heals alone.
// A revocation is reported on its own (checkRevoked).
func refusal(err error) string {
	var gs interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &gs) {
		return ""
	}
	st := gs.GRPCStatus()
	switch st.Code() {
	case codes.PermissionDenied, codes.InvalidArgument, codes.FailedPrecondition:
		if _, revoked := revokedReason(err); revoked {
			return ""
		}
		return st.Message()
	}
	return ""
}

// checkRevoked notes a refusal because the signer revoked this node: the
// status then says so first. The loops keep retrying with their backoff,
// so an unrevoke heals the agent by itself.
func (u *upstream) checkRevoked(err error) {
	if reason, ok := revokedReason(err); ok {
		u.update(func(s *upstreamSnapshot) { s.Revoked = reason })
	}
}

// revokedReason is the signer's reason when err is its refusal of a
// revoked node: PermissionDenied "node revoked: <reason>".
func revokedReason(err error) (string, bool) {
	// The status itself, not status.FromError's: that one's message is
	// the whole wrapped error text.
	var gs interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &gs) {
		return "", false
	}
	st := gs.GRPCStatus()
	if st.Code() != codes.PermissionDenied || !strings.HasPrefix(st.Message(), signerpb.RevokedPrefix) {
		return "", false
	}
	return strings.TrimPrefix(st.Message(), signerpb.RevokedPrefix), true
}

// requestReattest makes the attestation loop attest at once, whether it
// is waiting for the renewal point or for a retry.
func (u *upstream) requestReattest() {
	select {
	case u.reattest <- struct{}{}:
	default:
	}
}

// mintJWTSVIDs is the JWT token cache's way to the signer. Like a failed
// renewal, a signer that no longer knows this agent (it restarted)
// triggers a new attestation at once; the caller is answered after it,
// with one more try on the new identity, rather than failed for a state
// the agent repairs in a moment.
//
// A replica that cannot be reached is treated the same way when another
// one can serve: the agent switches (as the sync stream would make it do
// a moment later) and the caller is answered by the new replica.
func (u *upstream) mintJWTSVIDs(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
	replaced := u.link.replaced()
	resp, err := u.link.mintJWTSVIDs(ctx, reqs)
	switch {
	case status.Code(err) == codes.Unauthenticated:
	case err != nil && ctx.Err() == nil && u.replicas.lost(err, time.Now()):
		u.log.Warn("signer replica lost; switching to another", "error", err)
	default:
		return resp, err
	}
	u.requestReattest()
	t := time.NewTimer(u.reattestWait)
	defer t.Stop()
	select {
	case <-replaced:
	case <-t.C:
		return nil, fmt.Errorf("%w (no new attestation within %v)", err, u.reattestWait)
	case <-ctx.Done():
		return nil, err
	}
	return u.link.mintJWTSVIDs(ctx, reqs)
}

// applyBundle installs a trust bundle from the signer, for both verifying
// the signer and serving workloads.
func (u *upstream) applyBundle(b *signerpb.Bundle) error {
	if b.GetTrustDomain() != u.td.String() {
		return fmt.Errorf("bundle for trust domain %q, want %q", b.GetTrustDomain(), u.td)
	}
	cas, err := parseCerts("bundle", b.GetX509Authorities())
	if err != nil {
		return err
	}
	if len(cas) == 0 {
		return fmt.Errorf("bundle has no X.509 authorities")
	}
	u.trust.SetX509Authorities(cas)
	return u.sink.setBundle(cas, b)
}

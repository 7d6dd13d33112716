// Package agent is the lanyard-agent daemon: it attests the host with its
// TPM, keeps one sync stream open to the signer, holds an in-memory SVID for
// every entry its node may serve, and serves them on the SPIFFE Workload API.
package agent

import (
	"cmp"
	"context"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/attestor/workload"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Agent is one lanyard-agent. Create it with New, run it with Run.
type Agent struct {
	cfg     *Config
	log     hclog.Logger
	cache   *cache
	jwt     *jwtSource
	sched   rotator.Schedule
	backoff rotator.Backoff

	up        *upstream
	tpm       *tpmLink           // set by Run: the TPM, reopened when it goes away
	workload  *workload.Workload // set by Run before anything serves
	wakeRenew chan struct{}      // a sync changed the entries: look for work
	reattest  chan struct{}      // the signer no longer knows us: attest again
	// jwtReattestWait is jwtReattestWait but for tests.
	jwtReattestWait time.Duration
	synced          atomic.Bool
	ready           chan struct{} // attested, synced, first SVIDs signed
	readyOnce       sync.Once
	serving         chan struct{} // ready and the Workload API socket listens
	running         chan struct{} // Run has set up its parts: Status may be called
	started         time.Time
	trustWake       broadcast // trust_bundle_path brought a new authority, or a call got through: retry now (retryNow)

	// Facts for Status, written by the loops that own them.
	lastSync, servingSince, agentRenewAt        atomic.Int64 // unix nanoseconds
	syncFailures, attestFailures, renewFailures atomic.Int64
	syncConnected                               atomic.Bool
	tpmManufacturer                             string // read once at start

	metrics *metrics

	api *workloadapi.Server // set by Run before running closes; its limits feed Status
}

// New returns an agent for a validated config.
func New(cfg *Config, log hclog.Logger) *Agent {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	a := &Agent{
		cfg:             cfg,
		log:             log,
		cache:           newCache(cfg.TrustDomain.IDString()),
		sched:           rotator.Schedule{Jitter: rotator.DefaultJitter},
		backoff:         rotator.DefaultBackoff,
		wakeRenew:       make(chan struct{}, 1),
		reattest:        make(chan struct{}, 1),
		jwtReattestWait: jwtReattestWait,
		ready:           make(chan struct{}),
		serving:         make(chan struct{}),
		running:         make(chan struct{}),
	}
	a.jwt = newJWTSource(a.cache, a.mintJWTSVIDs, log.Named("jwt"))
	a.metrics = newMetrics(a)
	return a
}

// jwtReattestWait bounds how long a JWT-SVID call that found this agent
// unknown to the signer waits for the new attestation it triggers: one
// takes well under a second against swtpm and a few seconds on a slow
// hardware TPM, and the caller is waiting.
const jwtReattestWait = 10 * time.Second

// mintJWTSVIDs is the JWT token cache's way to the signer. Like a failed
// renewal, a signer that no longer knows this agent (it restarted)
// triggers a new attestation at once; the caller is answered after it,
// with one more try on the new identity, rather than failed for a state
// the agent repairs in a moment.
func (a *Agent) mintJWTSVIDs(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
	_, replaced := a.up.client()
	resp, err := a.up.mintJWTSVIDs(ctx, reqs)
	if status.Code(err) != codes.Unauthenticated {
		return resp, err
	}
	a.requestReattest()
	t := time.NewTimer(a.jwtReattestWait)
	defer t.Stop()
	select {
	case <-replaced:
	case <-t.C:
		return nil, fmt.Errorf("%w (no new attestation within %v)", err, a.jwtReattestWait)
	case <-ctx.Done():
		return nil, err
	}
	return a.up.mintJWTSVIDs(ctx, reqs)
}

// Serving is closed once the agent holds its identity, the entries and
// their SVIDs, and the Workload API socket accepts calls.
func (a *Agent) Serving() <-chan struct{} { return a.serving }

// Running is closed once Run has opened the TPM and set up its parts;
// from then on Status and Report may be called from any goroutine (the
// admin API and the systemd notifier do).
func (a *Agent) Running() <-chan struct{} { return a.running }

// Run opens the TPM and runs every part of the agent until ctx ends. It
// returns only after all of them have stopped.
func (a *Agent) Run(ctx context.Context) error {
	a.started = time.Now()
	trustSrc, err := os.ReadFile(a.cfg.TrustBundlePath)
	if err != nil {
		return fmt.Errorf("load trust bundle: %w", err)
	}
	trust, err := x509bundle.Parse(a.cfg.TrustDomain, trustSrc)
	if err != nil {
		return fmt.Errorf("load trust bundle %s: %w", a.cfg.TrustBundlePath, err)
	}
	// A TPM that cannot be opened at start is a config error (a wrong
	// path) as often as an outage: fail, and let the operator see it. One
	// that goes away later is reopened by a.tpm.
	tpmCfg := a.cfg.TPM
	tpm, err := node.OpenTPM(tpmCfg)
	if err != nil {
		return fmt.Errorf("open TPM: %w", err)
	}
	a.tpm = newTPMLink(tpm, func() (*node.TPM, error) { return node.OpenTPM(tpmCfg) }, a.log.Named("tpm"))
	defer a.tpm.close()
	a.tpm.probe = cmp.Or(a.cfg.TPM.ProbeInterval, DefaultTPMProbeInterval)
	a.tpm.backoff.Max = cmp.Or(a.cfg.TPM.ReopenMax, DefaultTPMReopenMax)
	a.tpm.rand = a.rand
	a.tpm.reopened = a.requestReattest
	if info, err := tpm.Info(); err == nil {
		a.tpmManufacturer = info.Manufacturer
		a.log.Info("TPM opened", "ek_sha256", info.EKSHA256, "manufacturer", info.Manufacturer, "ek_certificate", info.EKCertificate != nil)
	} else {
		a.log.Warn("cannot read TPM info", "error", err)
	}
	a.up, err = newUpstream(a.cfg.SignerAddress, a.cfg.TrustDomain, a.tpm, trust, a.log.Named("upstream"))
	if err != nil {
		return err
	}
	defer a.up.close()
	wl, err := workload.New(workload.Config{Attestors: a.cfg.WorkloadAttestors})
	if err != nil {
		return fmt.Errorf("workload attestors: %w", err)
	}
	a.workload = wl
	limits, err := a.cfg.Limits.workloadLimits()
	if err != nil {
		return err
	}
	api := workloadapi.New(workloadapi.Config{
		SocketPath: a.cfg.SocketPath,
		Attestor:   wl,
		Source:     a.cache,
		JWT:        a.jwt,
		Log:        a.log.Named("workloadapi"),
		Observer:   a.metrics,
		Limits:     limits,
	})
	a.api = api

	admin := &adminServer{path: a.cfg.AdminSocketPath, apiDir: filepath.Dir(a.cfg.SocketPath), log: a.log.Named("admin"), handler: a.adminHandler(), ready: make(chan struct{})}

	close(a.running)
	g, ctx := errgroup.WithContext(ctx)
	if err := a.serveTelemetry(ctx, g); err != nil {
		return err
	}
	g.Go(func() error { return admin.Run(ctx) })
	g.Go(func() error { return a.tpm.Run(ctx) })
	g.Go(func() error { return a.attestLoop(ctx) })
	g.Go(func() error { return a.syncLoop(ctx) })
	g.Go(func() error { return a.renewLoop(ctx) })
	g.Go(func() error { return a.watchTrust(ctx, trustSrc) })
	g.Go(func() error {
		// Listen only once there is something to serve, so a workload
		// never sees PermissionDenied merely because the agent is young.
		select {
		case <-a.ready:
		case <-ctx.Done():
			return nil
		}
		return api.Run(ctx)
	})
	g.Go(func() error {
		select {
		case <-api.Ready():
			a.servingSince.Store(time.Now().UnixNano())
			close(a.serving)
			a.log.Info("agent ready", "socket", a.cfg.SocketPath, "startup_ms", time.Since(a.started).Milliseconds())
		case <-ctx.Done():
		}
		return nil
	})
	return g.Wait()
}

// attestLoop attests at start (retrying until the signer answers), then
// again at half the agent SVID's lifetime, or at once when the signer says
// it no longer knows us.
func (a *Agent) attestLoop(ctx context.Context) error {
	failures := 0
	for {
		trustChanged := a.trustWake.C()
		a.reloadTrust()
		start := time.Now()
		res, err := a.up.attest(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			a.metrics.attestFailures.Inc()
			failures++
			a.attestFailures.Store(int64(failures))
			d := a.backoff.Delay(failures, a.rand())
			a.log.Error("attestation failed", "signer", a.cfg.SignerAddress, "error", err, "failures", failures, "retry_in", d.String())
			if !a.waitRetry(ctx, d, trustChanged, nil, a.reattest) {
				return nil
			}
			continue
		}
		if failures > 0 {
			a.retryNow()
		}
		a.metrics.attestDuration.Observe(time.Since(start).Seconds())
		failures = 0
		a.attestFailures.Store(0)
		// Renewals that failed on the old identity can go ahead now.
		select {
		case a.wakeRenew <- struct{}{}:
		default:
		}
		if err := a.applyBundle(res.GetBundle()); err != nil {
			a.log.Error("bad bundle from signer", "error", err)
		}
		svid := a.up.agentSVID()
		leaf := svid.Certificates[0]
		a.log.Info("agent attested", "spiffe_id", svid.ID.String(), "serial", leaf.SerialNumber.Text(16),
			"not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "node_selectors", res.GetNodeSelectors())
		// Scheduled from now, not the backdated NotBefore (see svid.received).
		renew := a.sched.RenewAt(time.Now(), leaf.NotAfter, a.jitter())
		a.agentRenewAt.Store(renew.UnixNano())
		t := time.NewTimer(time.Until(renew))
		select {
		case <-t.C:
		case <-a.reattest:
			t.Stop()
		case <-ctx.Done():
			t.Stop()
			return nil
		}
	}
}

// syncLoop holds the sync stream open on the current connection, applying
// every message, and reconnects with backoff when it breaks.
func (a *Agent) syncLoop(ctx context.Context) error {
	failures := 0
	for {
		// The signer may have restarted with a new CA since the last
		// attempt; its bundle file is how the agent learns it.
		trustChanged := a.trustWake.C()
		a.reloadTrust()
		client, replaced := a.up.client()
		if client == nil {
			select {
			case <-replaced:
				continue
			case <-ctx.Done():
				return nil
			}
		}
		err := a.syncOnce(ctx, client, &failures)
		a.syncConnected.Store(false)
		if ctx.Err() != nil {
			return nil
		}
		select {
		case <-replaced:
			continue // re-attested: the new connection is ready now
		default:
		}
		a.checkUnauthenticated(err)
		a.metrics.syncFailures.Inc()
		failures++
		a.syncFailures.Store(int64(failures))
		d := a.backoff.Delay(failures, a.rand())
		a.log.Warn("sync stream broken", "signer", a.cfg.SignerAddress, "error", err, "failures", failures, "retry_in", d.String())
		if !a.waitRetry(ctx, d, trustChanged, replaced, nil) {
			return nil
		}
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
func (a *Agent) waitRetry(ctx context.Context, d time.Duration, retry, replaced, reattest <-chan struct{}) bool {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	up := a.up.becameReady(wctx)
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
func (a *Agent) retryNow() {
	a.up.resetBackoff()
	a.trustWake.notify()
}

func (a *Agent) syncOnce(ctx context.Context, client signerpb.SignerClient, failures *int) error {
	stream, err := a.up.openSync(ctx, client)
	if err != nil {
		return err
	}
	for {
		msg, err := stream.Recv()
		if err != nil {
			return err
		}
		if *failures > 0 {
			a.retryNow()
		}
		*failures = 0
		a.syncFailures.Store(0)
		a.syncConnected.Store(true)
		a.lastSync.Store(time.Now().UnixNano())
		if err := a.applyBundle(msg.GetBundle()); err != nil {
			a.log.Error("bad bundle from signer", "error", err)
			continue
		}
		entries := validEntries(msg.GetEntries(), a.cfg.TrustDomain, a.log)
		a.cache.setEntries(entries)
		a.jwt.retain(entries)
		a.log.Debug("synced", "entries", len(msg.GetEntries()), "bundle_sequence", msg.GetBundle().GetSequence())
		a.synced.Store(true)
		select {
		case a.wakeRenew <- struct{}{}:
		default:
		}
	}
}

// reloadTrust adds the authorities in trust_bundle_path to those the agent
// trusts the signer by. A signer keeps its CA key only in memory, so after
// a restart it is known only by the bundle file the operator distributes;
// re-reading it before every attestation lets the agent follow.
func (a *Agent) reloadTrust() {
	b, err := x509bundle.Load(a.cfg.TrustDomain, a.cfg.TrustBundlePath)
	if err != nil {
		a.log.Warn("cannot read trust bundle file", "path", a.cfg.TrustBundlePath, "error", err)
		return
	}
	a.addTrust(b)
}

// checkUnauthenticated asks for a new attestation when the signer says it
// does not know this agent (it restarted, or the agent SVID lapsed): the
// agent SVID is the key to everything else, so it must not wait for a
// backoff timer to run out.
func (a *Agent) checkUnauthenticated(err error) {
	if status.Code(err) == codes.Unauthenticated {
		a.requestReattest()
	}
}

// requestReattest makes the attestation loop attest at once, whether it
// is waiting for the renewal point or for a retry.
func (a *Agent) requestReattest() {
	select {
	case a.reattest <- struct{}{}:
	default:
	}
}

// applyBundle installs a trust bundle from the signer, for both verifying
// the signer and serving workloads.
func (a *Agent) applyBundle(b *signerpb.Bundle) error {
	if b.GetTrustDomain() != a.cfg.TrustDomain.String() {
		return fmt.Errorf("bundle for trust domain %q, want %q", b.GetTrustDomain(), a.cfg.TrustDomain)
	}
	var cas []*x509.Certificate
	for _, der := range b.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("parse bundle: %w", err)
		}
		cas = append(cas, c)
	}
	if len(cas) == 0 {
		return fmt.Errorf("bundle has no X.509 authorities")
	}
	a.up.trust.SetX509Authorities(cas)
	if a.cache.setBundle(cas) {
		a.log.Info("trust bundle updated", "sequence", b.GetSequence(), "authorities", len(cas))
	}
	changed, err := a.cache.setJWTBundle(a.cfg.TrustDomain, b.GetJwtAuthorities())
	if err != nil {
		return fmt.Errorf("JWT bundle: %w", err)
	}
	if changed {
		a.log.Info("jwt bundle updated", "sequence", b.GetSequence(), "keys", len(b.GetJwtAuthorities()))
	}
	return nil
}

// validEntries drops entries the agent cannot serve correctly (the signer
// validated them; this guards against a signer of another trust domain)
// and sorts nothing: policy order is the response order.
func validEntries(in []*signerpb.Entry, td spiffeid.TrustDomain, log hclog.Logger) []*signerpb.Entry {
	out := make([]*signerpb.Entry, 0, len(in))
	for _, e := range in {
		id, err := spiffeid.FromString(e.GetSpiffeId())
		if err != nil || id.TrustDomain() != td || len(e.GetSelectors()) == 0 {
			log.Warn("ignoring invalid entry from signer", "entry", e.GetId(), "spiffe_id", e.GetSpiffeId())
			continue
		}
		out = append(out, e)
	}
	return out
}

func (a *Agent) markReady() { a.readyOnce.Do(func() { close(a.ready) }) }

// jitter draws a renewal jitter in [-1, 1].
func (a *Agent) jitter() float64 { return rand.Float64()*2 - 1 }

// rand draws a backoff jitter in [0, 1).
func (a *Agent) rand() float64 { return rand.Float64() }

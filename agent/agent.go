// Package agent is the lanyard-agent daemon: it attests the host with its
// TPM, keeps one sync stream open to the signer, holds an in-memory SVID for
// every entry its node may serve, and serves them on the SPIFFE Workload API.
//
// It is made of parts, each with its own Run, wired by Agent.Run: the TPM
// link (tpmlink.go), the upstream (attest and sync, upstream.go, over the
// signer connection in signerconn.go), the renewer (renew.go), the JWT
// token source (jwt.go), the admin server (admin.go) and the Workload API
// server. The cache (cache.go, jwtbundle.go) is what they share. The
// package is past ~800 lines because these parts share the cache's
// unexported types and the agent's one report; each file is one part.
package agent

import (
	"cmp"
	"context"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
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
)

// Agent is one lanyard-agent. Create it with New, run it with Run.
type Agent struct {
	cfg     *Config
	log     hclog.Logger
	cache   *cache
	jwt     *jwtSource
	tokens  *workloadapi.TokenGuard // revocations in force, used action tokens
	renew   *renewer
	up      *upstream
	metrics *metrics
	started time.Time

	// Set by Run before running closes.
	tpm             *tpmLink
	workload        *workload.Workload
	api             *workloadapi.Server // its limits feed the report
	tpmManufacturer string

	serving chan struct{} // ready and the Workload API socket listens
	running chan struct{} // Run has set up its parts: Report may be called
}

// New returns an agent for a validated config.
func New(cfg *Config, log hclog.Logger) *Agent {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	a := &Agent{cfg: cfg, log: log, serving: make(chan struct{}), running: make(chan struct{})}
	a.metrics = newMetrics()
	a.cache = newCache(cfg.TrustDomain.IDString())
	a.renew = newRenewer(a.cache, nil, log, a.metrics)
	a.tokens = workloadapi.NewTokenGuard(0)
	a.jwt = newJWTSource(a.cache, nil, log.Named("jwt"))
	a.jwt.guard = a.tokens
	a.up = &upstream{
		sink: served{cache: a.cache, jwt: a.jwt, tokens: a.tokens, renew: a.renew, td: cfg.TrustDomain, log: log},
		td:   cfg.TrustDomain, replicas: newReplicaSet(cfg.SignerAddresses, log.Named("upstream")), trustPath: cfg.TrustBundlePath,
		sched: a.renew.sched, backoff: rotator.DefaultBackoff, rand: randFloat, jitter: randJitter,
		log: log, metrics: a.metrics, reattestWait: jwtReattestWait,
		reattest: make(chan struct{}, 1),
	}
	a.renew.unknown = a.up.requestReattest
	a.jwt.mint = a.up.mintJWTSVIDs
	up := a.up
	a.metrics.watch(func() bool { return up.Snapshot().SyncConnected }, a.cache.earliestNotAfter)
	return a
}

// Serving is closed once the agent holds its identity, the entries and
// their SVIDs, and the Workload API socket accepts calls.
func (a *Agent) Serving() <-chan struct{} { return a.serving }

// Running is closed once Run has opened the TPM and set up its parts;
// from then on Report may be called from any goroutine (the admin API and
// the systemd notifier do).
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
	if err := a.openTPM(); err != nil {
		return err
	}
	defer a.tpm.close()
	conn, err := newSignerConn(a.up.replicas, a.cfg.TrustDomain, a.tpm, trust, a.log.Named("upstream"))
	if err != nil {
		return err
	}
	defer conn.close()
	a.up.link, a.up.trust, a.up.loaded, a.renew.signer = conn, trust, trustSrc, conn
	if a.workload, err = workload.New(workload.Config{Attestors: a.cfg.WorkloadAttestors}); err != nil {
		return fmt.Errorf("workload attestors: %w", err)
	}
	limits, err := a.cfg.Limits.workloadLimits()
	if err != nil {
		return err
	}
	api := workloadapi.New(workloadapi.Config{SocketPath: a.cfg.SocketPath, Attestor: a.workload, Source: a.cache,
		JWT: a.jwt, Tokens: a.tokens, Log: a.log.Named("workloadapi"), Observer: a.metrics, Limits: limits, SDS: a.cfg.workloadSDS(),
		Healthy: func() bool { return a.cache.holdsValidSVID(time.Now()) }})
	a.api = api
	admin := &adminServer{path: a.cfg.AdminSocketPath, apiDir: filepath.Dir(a.cfg.SocketPath), log: a.log.Named("admin"),
		handler: a.adminHandler(), ready: make(chan struct{})}

	close(a.running)
	g, ctx := errgroup.WithContext(ctx)
	if err := a.serveTelemetry(ctx, g); err != nil {
		return err
	}
	g.Go(func() error { return admin.Run(ctx) })
	g.Go(func() error { return a.tpm.Run(ctx) })
	g.Go(func() error { return a.up.Run(ctx) })
	g.Go(func() error { return a.renew.Run(ctx) })
	g.Go(func() error { return a.jwt.Run(ctx) })
	g.Go(func() error {
		// Listen only once there is something to serve, so a workload
		// never sees PermissionDenied merely because the agent is young.
		select {
		case <-a.renew.Ready():
		case <-ctx.Done():
			return nil
		}
		return api.Run(ctx)
	})
	g.Go(func() error {
		select {
		case <-api.Ready():
			close(a.serving)
			a.log.Info("agent ready", "socket", a.cfg.SocketPath, "startup_ms", time.Since(a.started).Milliseconds())
		case <-ctx.Done():
		}
		return nil
	})
	return g.Wait()
}

// openTPM opens the TPM into a new link. A TPM that cannot be opened at
// start is a config error (a wrong path) as often as an outage: fail, and
// let the operator see it. One that goes away later is reopened by the
// link, and each reopen is followed by a new attestation.
func (a *Agent) openTPM() error {
	tpmCfg := node.TPMConfig{Device: a.cfg.TPM.Device, Socket: a.cfg.TPM.Socket}
	tpm, err := node.OpenTPM(tpmCfg)
	if err != nil {
		return fmt.Errorf("open TPM: %w", err)
	}
	a.tpm = newTPMLink(tpm, func() (*node.TPM, error) { return node.OpenTPM(tpmCfg) }, a.log.Named("tpm"))
	a.tpm.probe = cmp.Or(a.cfg.TPM.ProbeInterval, DefaultTPMProbeInterval)
	a.tpm.backoff.Max = cmp.Or(a.cfg.TPM.ReopenMax, DefaultTPMReopenMax)
	a.tpm.rand = randFloat
	a.tpm.reopened = a.up.requestReattest
	if info, err := tpm.Info(); err == nil {
		a.tpmManufacturer = info.Manufacturer
		// Known before any attestation: it is what an operator pins, and
		// status shows it most when the signer refuses this TPM.
		a.up.update(func(s *upstreamSnapshot) { s.EKSHA256 = info.EKSHA256 })
		a.log.Info("TPM opened", "ek_sha256", info.EKSHA256, "manufacturer", info.Manufacturer, "ek_certificate", info.EKCertificate != nil)
	} else {
		a.log.Warn("cannot read TPM info", "error", err)
	}
	return nil
}

// served passes what the upstream receives to the parts that serve it.
type served struct {
	cache  *cache
	jwt    *jwtSource
	tokens *workloadapi.TokenGuard
	renew  *renewer
	td     spiffeid.TrustDomain
	log    hclog.Logger
}

func (s served) attested() { s.renew.wake() }

func (s served) setEntries(entries []*entry) {
	s.cache.setEntries(entries)
	s.jwt.retain(entries)
	s.renew.wake()
}

// setRevocations puts the token revocations in force, and drops the
// cached tokens they cover so that none is served again.
func (s served) setRevocations(revs []workloadapi.Revocation) {
	if s.tokens.Revocations(time.Now()) != len(revs) {
		s.log.Info("token revocations updated", "in_force", len(revs))
	}
	s.tokens.SetRevocations(revs, time.Now())
	s.jwt.dropRevoked()
}

func (s served) setFederated(good []*fedBundle, refused []spiffeid.TrustDomain) {
	logFederated(s.log, s.cache.setFederated(good, refused))
}

func (s served) setBundle(cas []*x509.Certificate, b *signerpb.Bundle) error {
	if s.cache.setBundle(cas) {
		s.log.Info("trust bundle updated", "sequence", b.GetSequence(), "authorities", len(cas))
	}
	changed, err := s.cache.setJWTBundle(s.td, b.GetJwtAuthorities())
	if err != nil {
		return fmt.Errorf("JWT bundle: %w", err)
	}
	if changed {
		s.log.Info("jwt bundle updated", "sequence", b.GetSequence(), "keys", len(b.GetJwtAuthorities()))
	}
	return nil
}

// randJitter draws a renewal jitter in [-1, 1].
func randJitter() float64 { return rand.Float64()*2 - 1 }

// randFloat draws a backoff jitter in [0, 1).
func randFloat() float64 { return rand.Float64() }

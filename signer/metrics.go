package signer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/telemetry"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics is the signer's Prometheus registry and instruments, served on
// metrics_address. Get it with Signer.Metrics; its methods are safe for
// concurrent use.
type Metrics struct {
	reg            *prometheus.Registry
	svidsSigned    prometheus.Counter
	svidRefusals   *prometheus.CounterVec
	attestations   *prometheus.CounterVec
	attestDuration prometheus.Histogram
	syncStreams    prometheus.Gauge
	policyReloads  *prometheus.CounterVec
	limitRefusals  *prometheus.CounterVec
	// revokedRefusals counts calls of revoked nodes refused, by method.
	revokedRefusals *prometheus.CounterVec
}

// Reasons a CSR was refused (svid_refusals_total's reason label).
const (
	refusedNotAttested   = "not_attested"
	refusedNotAuthorized = "not_authorized"
	refusedBadCSR        = "bad_csr"
	refusedSignError     = "sign_error"
	refusedTooMany       = "too_many_csrs"
	refusedEntryChanged  = "entry_changed"
)

func newMetrics(s *Signer) *Metrics {
	const ns = "lanyard_signer"
	m := &Metrics{
		reg: telemetry.NewRegistry(),
		svidsSigned: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "svids_signed_total",
			Help: "Workload X.509-SVIDs signed."}),
		svidRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "svid_refusals_total",
			Help: "CSRs refused, by reason."}, []string{"reason"}),
		attestations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "attestations_total",
			Help: "Agent attestations by result: ok, refused (policy or TPM proof), malformed, error."}, []string{"result"}),
		attestDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "attestation_duration_seconds",
			Help:    "Attestations from the agent's evidence to its SVID, challenge round trip included.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}),
		syncStreams: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "sync_streams",
			Help: "Open Sync streams: agents connected now."}),
		policyReloads: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "policy_reloads_total",
			Help: "Policy file reloads by result: ok, or error (the last good policy stays in force)."}, []string{"result"}),
		limitRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "limit_refusals_total",
			Help: "Calls refused or ended by a limit, by the limits field that was reached."}, []string{"limit"}),
		revokedRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "revoked_refusals_total",
			Help: "Calls of revoked nodes refused, by method: Attest, Sync, SignX509SVIDs, MintJWTSVIDs."}, []string{"method"}),
	}
	for _, l := range []string{limitPending, limitPendingPerAddress, limitFirstMessage, limitSyncStreams, limitJWTMintRate} {
		m.limitRefusals.WithLabelValues(l)
	}
	for _, r := range []string{"ok", "error"} {
		m.policyReloads.WithLabelValues(r) // present at 0, so alerts on increase() work from the start
	}
	m.attestations.WithLabelValues("ok")
	m.reg.MustRegister(m.svidsSigned, m.svidRefusals, m.attestations, m.attestDuration, m.syncStreams, m.policyReloads, m.limitRefusals, m.revokedRefusals)
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "pending_attestations",
		Help: "Attest streams in flight (unauthenticated until they succeed)."}, func() float64 {
		n, _ := s.gate.inFlight()
		return float64(n)
	}))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "attested_agents",
		Help: "Agents attested with this signer and still in policy (since its start)."}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(len(s.agents))
	}))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "ca_not_after_seconds",
		Help: "When the signing CA expires, in seconds since the Unix epoch."}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(s.auth.active.Cert.NotAfter.Unix())
	}))
	return m
}

// PolicyReload counts one reload of the policy file: ok when the new
// policy took effect, false when it was invalid and the last good policy
// stays in force. The policy watcher calls it.
func (m *Metrics) PolicyReload(ok bool) {
	if m == nil {
		return
	}
	result := "ok"
	if !ok {
		result = "error"
	}
	m.policyReloads.WithLabelValues(result).Inc()
}

// listenMetrics opens metrics_address; nil when it is not set.
func (s *Signer) listenMetrics() (net.Listener, error) {
	if s.cfg.MetricsAddress == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", s.cfg.MetricsAddress)
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w", s.cfg.MetricsAddress, err)
	}
	return ln, nil
}

// serveMetrics serves /metrics on ln until ctx ends.
func (s *Signer) serveMetrics(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", telemetry.MetricsHandler(s.metrics.reg, s.log.Named("metrics")))
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		code, body := s.readiness()
		w.WriteHeader(code)
		io.WriteString(w, body+"\n")
	})
	return telemetry.Serve(ctx, ln, mux, s.log.Named("http"))
}

// readiness is /ready: 503 until the signer serves agents (a joining
// replica waits its publish lead), 200 "ok" while it does, and 200
// "degraded: ..." while it serves but etcd is unreachable (it signs and
// syncs on; policy apply and node revoke are refused).
func (s *Signer) readiness() (int, string) {
	select {
	case <-s.ready:
	default:
		if t := s.tierStatus(); t != nil && !t.JoiningUntil.IsZero() {
			return http.StatusServiceUnavailable, "joining: serves agents from " + t.JoiningUntil.UTC().Format(time.RFC3339)
		}
		return http.StatusServiceUnavailable, "starting"
	}
	if t := s.tierStatus(); t != nil && !t.Etcd.OK {
		return http.StatusOK, "degraded: etcd unavailable: " + t.Etcd.Error
	}
	return http.StatusOK, "ok"
}

// Registry is where the signer's metrics live, for serving or tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// attestResult names the verifier's verdict for attestations_total: err
// is its refusal, nil when it accepted.
func attestResult(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, node.ErrMalformedEvidence):
		return "malformed"
	case errors.Is(err, ErrNodeRevoked):
		return "refused"
	case isRefusal(err):
		return "refused"
	}
	return "error"
}

// isRefusal reports whether err is one of the verifier's refusals.
func isRefusal(err error) bool {
	for _, r := range []error{node.ErrUnknownEK, node.ErrEKCertMissing, node.ErrEKCertUntrusted,
		node.ErrAKInvalid, node.ErrKeyNotCertified, node.ErrCSRKeyMismatch,
		node.ErrActivationMismatch, node.ErrChallengeUsed, errLeftPolicy} {
		if errors.Is(err, r) {
			return true
		}
	}
	return false
}

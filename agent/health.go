package agent

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/internal/telemetry"
	"golang.org/x/sync/errgroup"
)

// readiness says whether the agent is ready to serve: attested, synced at
// least once, and holding a valid SVID for every entry its node serves.
// A degraded agent (signer unreachable, SVIDs still valid) is ready: it
// serves correct identities. reason is one line for the 503 body.
func readiness(r Report) (ok bool, reason string) {
	switch {
	case r.Health == Unhealthy:
		return false, strings.Join(r.Reasons, "; ")
	case r.Signer.LastSync == nil:
		return false, "not synced with the signer yet"
	}
	if len(r.Reasons) > 0 {
		return true, r.Health + ": " + strings.Join(r.Reasons, "; ")
	}
	return true, r.Health
}

// healthHandler serves /live (the process answers) and /ready (see
// readiness) for probes that cannot use the root-only admin socket.
func (a *Agent) healthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		ok, reason := readiness(a.Report(time.Now()))
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready: "+reason)
			return
		}
		fmt.Fprintln(w, "ready: "+reason)
	})
	return mux
}

// serveTelemetry opens metrics_address and health_address (one listener
// when they are equal) at once, so that a port in use stops the start,
// and serves them in g until ctx ends.
func (a *Agent) serveTelemetry(ctx context.Context, g *errgroup.Group) error {
	eps := telemetry.Endpoints{}
	eps.Handle(a.cfg.MetricsAddress, "/metrics", telemetry.MetricsHandler(a.metrics.reg, a.log.Named("metrics")))
	health := a.healthHandler()
	eps.Handle(a.cfg.HealthAddress, "/live", health)
	eps.Handle(a.cfg.HealthAddress, "/ready", health)
	lns, err := eps.Listen()
	if err != nil {
		return fmt.Errorf("telemetry: %w", err)
	}
	for addr, ln := range lns {
		g.Go(func() error { return telemetry.Serve(ctx, ln, eps[addr], a.log.Named("http")) })
	}
	return nil
}

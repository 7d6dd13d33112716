// Package telemetry serves what Lanyard shows to monitoring: Prometheus
// metrics and HTTP health endpoints, on loopback addresses the operator
// opts into. Each process has its own registry; nothing here touches
// Prometheus's global default registry.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a fresh registry holding the Go runtime and process
// collectors, for one binary's metrics.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// MetricsHandler serves reg in the Prometheus exposition format. A
// collector that fails is logged and the rest is still served.
func MetricsHandler(reg *prometheus.Registry, log hclog.Logger) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:      errorLog{log},
		ErrorHandling: promhttp.ContinueOnError,
		Registry:      reg, // promhttp_metric_handler_* land in our registry, not the global one
	})
}

type errorLog struct{ log hclog.Logger }

func (l errorLog) Println(v ...any) { l.log.Warn("metrics: " + fmt.Sprint(v...)) }

// Endpoints groups handlers by listen address, so that metrics and health
// configured on the same address share one listener.
type Endpoints map[string]*http.ServeMux

// Handle adds h for pattern on addr; an empty addr means the endpoint is
// off and nothing is added.
func (e Endpoints) Handle(addr, pattern string, h http.Handler) {
	if addr == "" {
		return
	}
	mux, ok := e[addr]
	if !ok {
		mux = http.NewServeMux()
		e[addr] = mux
	}
	mux.Handle(pattern, h)
}

// Listen opens every address, so that a port in use fails the start
// instead of a goroutine later. The caller serves each with Serve.
func (e Endpoints) Listen() (map[string]net.Listener, error) {
	lns := make(map[string]net.Listener, len(e))
	for addr := range e {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("listen on %s: %w", addr, err)
		}
		lns[addr] = ln
	}
	return lns, nil
}

// Serve serves h on ln until ctx ends, then shuts down within a bound, and
// returns once the server has stopped.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, log hclog.Logger) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 30 * time.Second}
	log.Info("serving HTTP endpoints", "address", ln.Addr().String())
	return ServeServer(ctx, srv, ln)
}

// ServeServer runs srv on ln until ctx ends, then shuts it down within 2 s
// (closing what is left), and returns once it has stopped.
func ServeServer(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc
	return nil
}

package workloadapi

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// healthServiceName is the service name the health service reports under
// besides "" (the server as a whole): the Workload API's own.
const healthServiceName = "SpiffeWorkloadAPI"

// serveHealth registers the standard gRPC health service on srv, so that
// `spire-agent healthcheck`, grpc_health_probe and Kubernetes gRPC probes
// work against the Workload API socket. The status is SERVING while
// healthy() says the agent holds a valid SVID, else NOT_SERVING; it is
// recomputed whenever the Source changes (SVIDs signed, expired, entries
// or bundle replaced), so Watch streams hear of it at once. It runs until
// ctx ends. Like reflection, it needs no security header and attests
// nobody: it says only whether the agent can serve.
func serveHealth(ctx context.Context, srv *grpc.Server, src Source, healthy func() bool) {
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	set := func() {
		st := healthpb.HealthCheckResponse_SERVING
		if healthy != nil && !healthy() {
			st = healthpb.HealthCheckResponse_NOT_SERVING
		}
		hs.SetServingStatus("", st)
		hs.SetServingStatus(healthServiceName, st)
	}
	set()
	go func() {
		for {
			// The bundles' change channel closes on every change of the
			// Source, the SVIDs' included.
			_, changed := src.X509BundlesResponse()
			select {
			case <-changed:
				set()
			case <-ctx.Done():
				hs.Shutdown()
				return
			}
		}
	}()
}

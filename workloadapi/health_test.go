package workloadapi

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// TestHealthService: the standard gRPC health service answers on the
// Workload API socket without the security header (as health probes and
// `spire-agent healthcheck` call it), SERVING while the agent holds a valid
// SVID and NOT_SERVING when it holds none, and a Watch hears the change.
func TestHealthService(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	var healthy atomic.Bool
	healthy.Store(true)
	srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, Healthy: healthy.Load})

	conn, err := grpc.NewClient("unix://"+srv.path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc := healthpb.NewHealthClient(conn)
	for _, service := range []string{"", "SpiffeWorkloadAPI"} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: service}) // no security header
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("Check(%q) = %v, %v; want SERVING", service, resp.GetStatus(), err)
		}
	}
	watch, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first Watch answer: %v, %v", r.GetStatus(), err)
	}
	healthy.Store(false)
	src.set(uidSelector(), nil) // the Source changes: its SVIDs lapsed
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch after the SVIDs lapsed: %v, %v; want NOT_SERVING", r.GetStatus(), err)
	}
	if resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("Check = %v, %v; want NOT_SERVING", resp.GetStatus(), err)
	}
}

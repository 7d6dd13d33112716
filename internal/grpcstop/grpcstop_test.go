package grpcstop

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// serve runs a gRPC server with the health service on a Unix socket.
func serve(t *testing.T) (*grpc.Server, string, <-chan error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	return srv, path, served
}

func TestStopIdle(t *testing.T) {
	srv, _, served := serve(t)
	Stop(srv, time.Minute) // nothing open: returns at once, not after a minute
	// ErrServerStopped when Stop came before Serve got going.
	if err := <-served; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		t.Errorf("Serve = %v after Stop", err)
	}
}

// TestStopCutsOpenStream: a stream that never ends is cut after d, and
// Stop returns then.
func TestStopCutsOpenStream(t *testing.T) {
	srv, path, served := serve(t)
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Recv(); err != nil { // the stream is open on the server
		t.Fatal(err)
	}
	start := time.Now()
	Stop(srv, 100*time.Millisecond)
	if took := time.Since(start); took < 100*time.Millisecond {
		t.Errorf("Stop returned after %v, before the grace period ended", took)
	}
	if _, err := watch.Recv(); err == nil {
		t.Error("the open stream survived Stop")
	}
	<-served
}

// TestStopWaitsForGrace runs the timer logic in a synctest bubble: with
// nothing to stop, Stop returns without waiting d.
func TestStopWaitsForGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := grpc.NewServer()
		start := time.Now()
		Stop(srv, time.Hour)
		if took := time.Since(start); took != 0 {
			t.Errorf("Stop of an idle server took %v of fake time, want 0", took)
		}
	})
}

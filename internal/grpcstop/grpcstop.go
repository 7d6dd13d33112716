// Package grpcstop stops a gRPC server the way both daemons need: calls in
// flight may finish, but streams that never end by themselves (Workload API
// watchers, agents' Sync streams) must not hold the shutdown up.
package grpcstop

import (
	"time"

	"google.golang.org/grpc"
)

// Stop runs GracefulStop, and after d cuts whatever is still open with
// Stop (which also makes the GracefulStop in progress return). It returns
// once the server has stopped.
func Stop(srv *grpc.Server, d time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		srv.Stop()
		<-done
	}
}

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// floorServer is the least a Workload API server can do: check the header,
// then send one canned FetchX509SVID response and hold the stream open. It
// does no attestation, matching or caching, so the agent's time over it is
// the agent's own cost.
type floorServer struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	resp *workload.X509SVIDResponse
}

func (f *floorServer) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	if err := stream.Send(f.resp); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// serveFloor serves the response read from in (a marshaled
// X509SVIDResponse) on socket until ctx ends. It writes "ready" to ready
// once it listens. The response carries a workload private key, so it
// comes over a pipe and is never written to disk.
func serveFloor(ctx context.Context, socket string, in io.Reader, ready io.Writer) error {
	b, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("floor: read response: %w", err)
	}
	resp := &workload.X509SVIDResponse{}
	if err := proto.Unmarshal(b, resp); err != nil {
		return fmt.Errorf("floor: decode response: %w", err)
	}
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("floor: listen on %s: %w", socket, err)
	}
	srv := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(srv, &floorServer{resp: resp})
	go func() {
		<-ctx.Done()
		srv.Stop()
	}()
	fmt.Fprintln(ready, "ready")
	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("floor: serve: %w", err)
	}
	return nil
}

// floorProcess is a floor server running as a child process (this binary,
// "floor --socket"), so it pays for its own process as the agent does and
// shares no heap or scheduler with the clients.
type floorProcess struct {
	cmd    *exec.Cmd
	socket string
}

// startFloor starts the child and hands it resp over its stdin.
func startFloor(dir string, resp *workload.X509SVIDResponse) (*floorProcess, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("floor: find own binary: %w", err)
	}
	b, err := proto.Marshal(resp)
	if err != nil {
		return nil, fmt.Errorf("floor: encode response: %w", err)
	}
	socket := filepath.Join(dir, "floor.sock")
	cmd := exec.Command(self, "floor", "--socket", socket)
	cmd.Stdin = strings.NewReader(string(b))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("floor: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("floor: start: %w", err)
	}
	f := &floorProcess{cmd: cmd, socket: socket}
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) != "ready" {
			f.stop()
			return nil, errors.New("floor: the child exited before serving")
		}
	case <-time.After(10 * time.Second):
		f.stop()
		return nil, errors.New("floor: not ready within 10s")
	}
	return f, nil
}

func (f *floorProcess) stop() {
	_ = f.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = f.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = f.cmd.Process.Kill()
		<-done
	}
}

package workloadapi

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
)

// countingPool is a mem.BufferPool that counts buffers out, so a test can
// tell that nothing is held while a connection waits.
type countingPool struct {
	gets, out atomic.Int64
}

func (p *countingPool) Get(n int) *[]byte {
	p.gets.Add(1)
	p.out.Add(1)
	b := make([]byte, n)
	return &b
}

func (p *countingPool) Put(*[]byte) { p.out.Add(-1) }

// socketPair returns the two ends of a connected Unix stream socket pair.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

func readyReadOf(t *testing.T, c *net.UnixConn) *readyRead {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return newReadyRead(raw)
}

func TestReadyRead(t *testing.T) {
	t.Run("data ready", func(t *testing.T) {
		a, b := socketPair(t)
		if _, err := b.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		pool := &countingPool{}
		buf, n, err := readyReadOf(t, a).ReadOnReady(64, pool)
		if err != nil || string((*buf)[:n]) != "hello" {
			t.Fatalf("ReadOnReady = %q, %v; want hello", (*buf)[:n], err)
		}
		if len(*buf) != 64 || pool.out.Load() != 1 {
			t.Fatalf("got a %d-byte buffer with %d out; want the pool's 64 bytes, handed to the caller", len(*buf), pool.out.Load())
		}
	})
	t.Run("waits holding no buffer", func(t *testing.T) {
		a, b := socketPair(t)
		pool := &countingPool{}
		type result struct {
			s   string
			err error
		}
		done := make(chan result, 1)
		go func() {
			buf, n, err := readyReadOf(t, a).ReadOnReady(64, pool)
			if err != nil {
				done <- result{err: err}
				return
			}
			done <- result{s: string((*buf)[:n])}
		}()
		// The first try found nothing, gave its buffer back and parked.
		deadline := time.Now().Add(10 * time.Second)
		for pool.gets.Load() == 0 || pool.out.Load() != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("no parked read: %d gets, %d out", pool.gets.Load(), pool.out.Load())
			}
			time.Sleep(time.Millisecond)
		}
		select {
		case r := <-done:
			t.Fatalf("ReadOnReady returned %+v before any data was sent", r)
		default:
		}
		if _, err := b.Write([]byte("late")); err != nil {
			t.Fatal(err)
		}
		if r := <-done; r.err != nil || r.s != "late" {
			t.Fatalf("ReadOnReady = %+v; want late", r)
		}
	})
	t.Run("end of stream", func(t *testing.T) {
		a, b := socketPair(t)
		b.Close()
		pool := &countingPool{}
		buf, n, err := readyReadOf(t, a).ReadOnReady(64, pool)
		if err != io.EOF || buf != nil || n != 0 || pool.out.Load() != 0 {
			t.Fatalf("ReadOnReady = %v, %d, %v with %d out; want io.EOF, nothing held", buf, n, err, pool.out.Load())
		}
	})
	t.Run("closed connection", func(t *testing.T) {
		a, _ := socketPair(t)
		rr := readyReadOf(t, a)
		a.Close()
		pool := &countingPool{}
		buf, _, err := rr.ReadOnReady(64, pool)
		if err == nil || buf != nil || pool.out.Load() != 0 {
			t.Fatalf("ReadOnReady on a closed connection = %v, %v with %d out; want an error, nothing held", buf, err, pool.out.Load())
		}
	})
}

// readyConn is a wrapped connection offering ReadOnReady as peerConn does,
// counting the calls.
type readyConn struct {
	*net.UnixConn
	rr    *readyRead
	calls *atomic.Int64
}

func (c readyConn) ReadOnReady(size int, pool mem.BufferPool) (*[]byte, int, error) {
	c.calls.Add(1)
	return c.rr.ReadOnReady(size, pool)
}

type readyListener struct {
	*net.UnixListener
	calls *atomic.Int64
}

func (l readyListener) Accept() (net.Conn, error) {
	c, err := l.AcceptUnix()
	if err != nil {
		return nil, err
	}
	raw, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	return readyConn{UnixConn: c, rr: newReadyRead(raw), calls: l.calls}, nil
}

// gRPC's framer must read a wrapped connection through ReadOnReady (the
// method set of its internal readyreader.Reader), or every idle stream
// holds a read buffer again: this fails if a gRPC upgrade stops looking.
func TestGRPCReadsThroughReadyRead(t *testing.T) {
	path := filepath.Join(socketDir(t), "ready.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = srv.Serve(readyListener{UnixListener: ln, calls: &calls}) }()
	t.Cleanup(func() { srv.Stop(); wg.Wait() })

	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	if calls.Load() == 0 {
		t.Fatal("gRPC read the connection without calling ReadOnReady")
	}
}

// TestConnNotSyscallConn: what gRPC is handed offers ReadOnReady but no
// SyscallConn, so gRPC's channelz does not read four socket options per
// connection.
func TestConnNotSyscallConn(t *testing.T) {
	for _, c := range []net.Conn{&peerConn{}, &limitedConn{peerConn: &peerConn{}}} {
		if _, ok := c.(syscall.Conn); ok {
			t.Errorf("%T is a syscall.Conn", c)
		}
		if _, ok := c.(interface {
			ReadOnReady(int, mem.BufferPool) (*[]byte, int, error)
		}); !ok {
			t.Errorf("%T lacks ReadOnReady", c)
		}
	}
}

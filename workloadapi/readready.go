package workloadapi

import (
	"errors"
	"io"
	"syscall"

	"google.golang.org/grpc/mem"
)

// readyRead lets gRPC read a connection through a buffer it takes from its
// pool only once the socket has data, and gives back as soon as the data
// is consumed. An idle connection, which is what a Workload API stream is
// for hours, then holds no read buffer at all; a busy one reads a whole
// burst of frames (a client's preface, settings, headers and request) in
// one system call instead of two per frame.
//
// gRPC's HTTP/2 framer does this by itself for a bare *net.UnixConn. Ours
// is wrapped (it carries the caller's pidfd and limits), so it offers the
// same through ReadOnReady, the method gRPC's framer looks for
// (google.golang.org/grpc/internal/transport/readyreader.Reader): the
// method set is the contract, and readready_test.go checks that gRPC takes
// it.
type readyRead struct {
	raw syscall.RawConn
	fn  func(fd uintptr) bool // reads into buf; allocated once per connection

	// Per ReadOnReady call; only the connection's one reader goroutine
	// uses them.
	size int
	pool mem.BufferPool
	buf  *[]byte
	n    int
	err  error
}

func newReadyRead(raw syscall.RawConn) *readyRead {
	r := &readyRead{raw: raw}
	r.fn = func(fd uintptr) bool {
		r.buf = r.pool.Get(r.size)
		for {
			// syscall.Read, not unix.Read: under -race it records that
			// what was written to the socket happened before this read,
			// as every read of a net.Conn does; without that, state a
			// peer in the same process set before writing looks racy.
			r.n, r.err = syscall.Read(int(fd), *r.buf)
			if !errors.Is(r.err, syscall.EINTR) {
				break
			}
		}
		if r.err != nil {
			r.pool.Put(r.buf)
			r.buf, r.n = nil, 0
			// Not ready: the runtime's poller parks the reader until
			// it is, holding no buffer meanwhile.
			return !errors.Is(r.err, syscall.EAGAIN)
		}
		return true
	}
	return r
}

// ReadOnReady waits until the connection is readable, then reads up to
// size bytes into a buffer from pool and returns it; the caller gives it
// back. At the end of the stream it returns io.EOF and no buffer.
func (r *readyRead) ReadOnReady(size int, pool mem.BufferPool) (*[]byte, int, error) {
	r.size, r.pool = size, pool
	err := r.raw.Read(r.fn)
	buf, n, readErr := r.buf, r.n, r.err
	r.pool, r.buf, r.n, r.err = nil, nil, 0, nil
	switch {
	case err != nil: // closed, or a deadline passed
		if buf != nil {
			pool.Put(buf)
		}
		return nil, 0, err
	case readErr != nil:
		return nil, 0, readErr
	case n == 0:
		pool.Put(buf)
		return nil, 0, io.EOF
	}
	return buf, n, nil
}

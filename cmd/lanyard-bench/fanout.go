package main

import (
	"context"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
)

// streamSet is open FetchX509SVID streams, one per connection: the honest
// worst case, since 10,000 workloads each hold their own client. It notes
// when each stream first saw each leaf serial.
type streamSet struct {
	socket string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	conns   []*grpc.ClientConn
	current []string // per stream, the serial it holds now
	seen    map[string]*arrival
	failed  error
	change  chan struct{} // closed and replaced on every arrival
}

// arrival is one serial as the streams received it.
type arrival struct {
	first, last time.Time
	count       int
}

func newStreamSet(socket string) *streamSet {
	ctx, cancel := context.WithCancel(workloadCtx(context.Background()))
	return &streamSet{socket: socket, ctx: ctx, cancel: cancel, seen: make(map[string]*arrival), change: make(chan struct{})}
}

// grow opens streams until there are n, perConn on each new connection,
// and waits until every one holds a response.
func (s *streamSet) grow(n, perConn int, timeout time.Duration) error {
	if _, err := raiseNoFile(uint64(n + 1024)); err != nil {
		return err
	}
	var cc *grpc.ClientConn
	s.mu.Lock()
	start := len(s.current)
	s.mu.Unlock()
	for i := start; i < n; i++ {
		if (i-start)%perConn == 0 {
			var err error
			if cc, err = dial(s.socket); err != nil {
				return err
			}
			s.mu.Lock()
			s.conns = append(s.conns, cc)
			s.mu.Unlock()
		}
		stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(s.ctx, &workload.X509SVIDRequest{})
		if err != nil {
			return fmt.Errorf("open stream %d: %w", i, err)
		}
		s.mu.Lock()
		s.current = append(s.current, "")
		s.mu.Unlock()
		s.wg.Add(1)
		go s.read(i, stream)
	}
	return s.waitFor(func() bool {
		for _, c := range s.current {
			if c == "" {
				return false
			}
		}
		return true
	}, timeout)
}

func (s *streamSet) read(i int, stream grpc.ServerStreamingClient[workload.X509SVIDResponse]) {
	defer s.wg.Done()
	for {
		resp, err := stream.Recv()
		at := time.Now()
		if err == nil {
			var serial string
			serial, err = leafSerial(resp)
			if err == nil {
				s.note(i, serial, at)
				continue
			}
		}
		if s.ctx.Err() == nil {
			s.mu.Lock()
			if s.failed == nil {
				s.failed = fmt.Errorf("stream %d: %w", i, err)
			}
			s.wakeLocked()
			s.mu.Unlock()
		}
		return
	}
}

func (s *streamSet) note(i int, serial string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current[i] == serial {
		return
	}
	s.current[i] = serial
	a := s.seen[serial]
	if a == nil {
		a = &arrival{first: at}
		s.seen[serial] = a
	}
	a.count++
	a.last = at
	s.wakeLocked()
}

func (s *streamSet) wakeLocked() {
	close(s.change)
	s.change = make(chan struct{})
}

// waitFor waits until cond (called with s.mu held) holds, a stream fails,
// or timeout passes.
func (s *streamSet) waitFor(cond func() bool, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		ok, failed, change := cond(), s.failed, s.change
		s.mu.Unlock()
		if failed != nil {
			return failed
		}
		if ok {
			return nil
		}
		select {
		case <-change:
		case <-deadline.C:
			return fmt.Errorf("condition not met within %v", timeout)
		}
	}
}

// rotations waits for the next n serials that every stream receives and
// returns, for each, the time from the first stream getting it to the last.
func (s *streamSet) rotations(n int, timeout time.Duration) ([]time.Duration, error) {
	s.mu.Lock()
	known := make(map[string]bool, len(s.seen))
	for serial := range s.seen {
		known[serial] = true
	}
	s.mu.Unlock()
	var spreads []time.Duration
	for len(spreads) < n {
		var got string
		err := s.waitFor(func() bool {
			for serial, a := range s.seen {
				if !known[serial] && a.count == len(s.current) {
					got = serial
					return true
				}
			}
			return false
		}, timeout)
		if err != nil {
			return spreads, fmt.Errorf("rotation %d of %d at %d streams: %w", len(spreads)+1, n, len(s.current), err)
		}
		s.mu.Lock()
		a := s.seen[got]
		spreads = append(spreads, a.last.Sub(a.first))
		s.mu.Unlock()
		known[got] = true
	}
	return spreads, nil
}

// close ends every stream and connection.
func (s *streamSet) close() {
	s.cancel()
	s.mu.Lock()
	conns := s.conns
	s.mu.Unlock()
	for _, cc := range conns {
		_ = cc.Close()
	}
	s.wg.Wait()
}

// leafSerial returns the leaf serial of the response's first SVID. It
// reads only the fields in front of the serial, so the reader's own cost
// stays out of the figure.
func leafSerial(resp *workload.X509SVIDResponse) (string, error) {
	svids := resp.GetSvids()
	if len(svids) == 0 {
		return "", errors.New("response without SVIDs")
	}
	var cert struct {
		TBS struct {
			Version int `asn1:"optional,explicit,default:0,tag:0"`
			Serial  *big.Int
		}
	}
	if _, err := asn1.Unmarshal(svids[0].GetX509Svid(), &cert); err != nil {
		return "", fmt.Errorf("read leaf serial: %w", err)
	}
	return cert.TBS.Serial.Text(16), nil
}

// raiseNoFile raises the soft RLIMIT_NOFILE towards need, as far as the
// hard limit allows, and returns the soft limit now in force. Children
// started later (the agent under "suite") inherit it.
func raiseNoFile(need uint64) (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit RLIMIT_NOFILE: %w", err)
	}
	if lim.Cur >= need {
		return lim.Cur, nil
	}
	lim.Cur = min(need, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("setrlimit RLIMIT_NOFILE to %d: %w", lim.Cur, err)
	}
	return lim.Cur, nil
}

// hardNoFile is the hard RLIMIT_NOFILE: the most an agent started by this
// process (or, as a guess, any agent on this host) can raise its own to.
func hardNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit RLIMIT_NOFILE: %w", err)
	}
	return lim.Max, nil
}

// perConnection is how many streams share a connection so that n streams
// fit in limit file descriptors on the agent's side, which holds a socket
// and the caller's pidfd per connection: 1 whenever it fits.
func perConnection(n int, limit uint64) int {
	conns := (int(limit) - 1024) / 2
	if conns <= 0 {
		return n
	}
	return (n + conns - 1) / conns
}

package agent

// How fast a rotation reaches every open Workload API stream: the agent's
// cache and the real Workload API server on a real Unix socket, read by
// many FetchX509SVID streams in this process.
//
// Streams are raw gRPC streams, not go-spiffe clients: a go-spiffe client
// parses and verifies every SVID it receives, which would put the reader's
// own cost into the latency measured here. The layout is a parameter:
// perconn=100 multiplexes 100 streams on each connection (cheap to set up,
// lets the server batch writes), perconn=1 gives each stream its own
// connection, as 1,000 workloads each holding one go-spiffe client would.
//
// CPU time is RUSAGE_SELF, so it counts both sides: the server's wake-up,
// encode and write per stream, and the client's read and decode per stream.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
	"github.com/lanyard-dev/lanyard/workloadapi"
)

const (
	// fanoutTimeout bounds each rotation (and opening the streams): a
	// fan-out that takes longer is broken, not slow.
	fanoutTimeout = 10 * time.Second
	// fanoutEntryID is the one entry every stream is entitled to.
	fanoutEntryID = "w"
)

// fanoutCA signs the leaves a rotation hands out.
func fanoutCA(tb testing.TB) *testCA { return newTestCA(tb, "fan-out test CA") }

// leaf returns a fresh SVID for the fan-out entry with this serial. Serials
// only grow, so a stream's serials must too.
func (ca *testCA) leaf(tb testing.TB, serial int64) *svid {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("generate leaf key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{{Scheme: "spiffe", Host: "example.org", Path: "/" + fanoutEntryID}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		tb.Fatalf("sign leaf: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("parse leaf: %v", err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatalf("encode leaf key: %v", err)
	}
	return &svid{key: entryKey{fanoutEntryID, 1}, chain: []*x509.Certificate{cert}, keyPKCS8: pkcs8, received: time.Now()}
}

// startFanoutServer fills a cache with one entry the test process is
// entitled to (by uid) and its SVID of serial 1, serves it on a fresh
// socket, and stops the server when the test ends.
func startFanoutServer(tb testing.TB, ca *testCA, log hclog.Logger) (*cache, string) {
	tb.Helper()
	c, dir := fanoutFixture(tb, ca)
	path := filepath.Join(dir, "w.sock")
	runServer(tb, workloadapi.Config{SocketPath: path, Attestor: unixOnly, Source: c, Log: log})
	return c, path
}

// fanoutFixture returns a cache holding the fan-out entry (the test
// process, by uid) and its SVID of serial 1, and a fresh directory for the
// socket, removed when the test ends.
func fanoutFixture(tb testing.TB, ca *testCA) (*cache, string) {
	tb.Helper()
	c := newCache("spiffe://example.org")
	c.setBundle([]*x509.Certificate{ca.Cert})
	c.setEntries([]*entry{{
		ID:        fanoutEntryID,
		SPIFFEID:  spiffeid.RequireFromString("spiffe://example.org/" + fanoutEntryID),
		Selectors: []string{"unix:uid:" + strconv.Itoa(os.Getuid())},
		Revision:  1,
	}})
	c.putSVIDs([]*svid{ca.leaf(tb, 1)})
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		tb.Fatalf("socket directory: %v", err)
	}
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	return c, dir
}

// runServer runs a Workload API server for cfg until the test ends (its
// cleanup is registered now, so it runs after cleanups registered later,
// such as the streams') and returns once it listens.
func runServer(tb testing.TB, cfg workloadapi.Config) {
	tb.Helper()
	srv := workloadapi.New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				tb.Errorf("server Run: %v", err)
			}
		case <-time.After(fanoutTimeout):
			tb.Errorf("server Run did not return within %v of cancel", fanoutTimeout)
		}
	})
	select {
	case <-srv.Ready():
	case err := <-done:
		tb.Fatalf("server Run: %v", err)
	case <-time.After(fanoutTimeout):
		tb.Fatalf("server not ready after %v", fanoutTimeout)
	}
}

// fanoutArrival is one response as a stream saw it.
type fanoutArrival struct {
	serial int64
	at     time.Time
}

// fanoutLog is what one stream received, in order.
type fanoutLog struct {
	mu  sync.Mutex
	got []fanoutArrival
}

// fanoutStreams is N open FetchX509SVID streams. Each reader logs every
// response and counts down remaining when it first sees target, so the
// waiter learns that the last stream got it without polling N logs.
type fanoutStreams struct {
	logs      []fanoutLog
	target    atomic.Int64
	remaining atomic.Int64
	reached   chan struct{}   // one send per armed serial, by the last stream
	errs      chan error      // at most one per stream
	stopping  <-chan struct{} // closed when the test closes the streams
}

// openFanoutStreams opens n streams over ceil(n/perConn) connections and
// waits until every one has its first response (serial 1). They are closed
// when the test ends.
func openFanoutStreams(tb testing.TB, path string, n, perConn int) *fanoutStreams {
	tb.Helper()
	conns := (n + perConn - 1) / perConn
	raiseNoFile(tb, uint64(2*conns+256)) // both ends of each connection live here
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"))
	f := &fanoutStreams{
		logs:     make([]fanoutLog, n),
		reached:  make(chan struct{}, 1),
		errs:     make(chan error, n),
		stopping: ctx.Done(),
	}
	var wg sync.WaitGroup
	var open []*grpc.ClientConn
	tb.Cleanup(func() {
		cancel()
		for _, cc := range open {
			_ = cc.Close()
		}
		wg.Wait()
	})
	f.arm(1)
	for i := 0; i < n; i++ {
		if i%perConn == 0 {
			cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				tb.Fatalf("connection %d: %v", len(open), err)
			}
			open = append(open, cc)
		}
		stream, err := workload.NewSpiffeWorkloadAPIClient(open[len(open)-1]).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err != nil {
			tb.Fatalf("open stream %d: %v", i, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.read(i, stream)
		}()
	}
	if err := f.wait(fanoutTimeout); err != nil {
		tb.Fatalf("opening %d streams: %v", n, err)
	}
	return f
}

// arm sets the serial to wait for; call it before the rotation.
func (f *fanoutStreams) arm(serial int64) {
	f.remaining.Store(int64(len(f.logs)))
	f.target.Store(serial)
}

// read logs every response of stream i until the stream ends.
func (f *fanoutStreams) read(i int, stream grpc.ServerStreamingClient[workload.X509SVIDResponse]) {
	var counted int64
	for {
		resp, err := stream.Recv()
		at := time.Now()
		if err != nil {
			select {
			case <-f.stopping:
			default:
				f.errs <- fmt.Errorf("stream %d: %w", i, err)
			}
			return
		}
		serial, err := leafSerial(resp)
		if err != nil {
			f.errs <- fmt.Errorf("stream %d: %w", i, err)
			return
		}
		l := &f.logs[i]
		l.mu.Lock()
		l.got = append(l.got, fanoutArrival{serial: serial, at: at})
		l.mu.Unlock()
		if serial == f.target.Load() && serial != counted {
			counted = serial
			if f.remaining.Add(-1) == 0 {
				select {
				case f.reached <- struct{}{}:
				default: // a signal nobody took: that wait already failed
				}
			}
		}
	}
}

// wait returns once every stream has the armed serial, a stream failed, or
// timeout passed.
func (f *fanoutStreams) wait(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-f.reached:
		return nil
	case err := <-f.errs:
		return err
	case <-t.C:
		return fmt.Errorf("%d of %d streams lack serial %d after %v", f.remaining.Load(), len(f.logs), f.target.Load(), timeout)
	}
}

// received returns a copy of what stream i received, in order.
func (f *fanoutStreams) received(i int) []fanoutArrival {
	l := &f.logs[i]
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.got)
}

// leafSerial returns the serial of the leaf of resp's only SVID. It decodes
// just the fields in front of the serial (encoding/asn1 ignores the rest of
// a SEQUENCE): a full x509.ParseCertificate per stream per rotation would
// add the reader's own cost to what is measured.
func leafSerial(resp *workload.X509SVIDResponse) (int64, error) {
	svids := resp.GetSvids()
	if len(svids) != 1 {
		return 0, fmt.Errorf("response holds %d SVIDs, want 1", len(svids))
	}
	var cert struct {
		TBS struct {
			Version int `asn1:"optional,explicit,default:0,tag:0"`
			Serial  *big.Int
		}
	}
	if _, err := asn1.Unmarshal(svids[0].GetX509Svid(), &cert); err != nil {
		return 0, fmt.Errorf("read leaf serial: %w", err)
	}
	if !cert.TBS.Serial.IsInt64() {
		return 0, errors.New("read leaf serial: not one this test issued")
	}
	return cert.TBS.Serial.Int64(), nil
}

// raiseNoFile raises the soft RLIMIT_NOFILE to need if it is lower. Go
// already raises it to the hard limit at start-up; this only fails clearly
// where the hard limit is too low.
func raiseNoFile(tb testing.TB, need uint64) {
	tb.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatalf("getrlimit RLIMIT_NOFILE: %v", err)
	}
	if lim.Cur >= need {
		return
	}
	if lim.Max < need {
		tb.Skipf("needs %d file descriptors, hard RLIMIT_NOFILE is %d", need, lim.Max)
	}
	lim.Cur = need
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatalf("setrlimit RLIMIT_NOFILE to %d: %v", need, err)
	}
}

// TestRotationReachesEveryStream checks the fan-out itself: each rotation
// reaches every open stream, once, in order.
func TestRotationReachesEveryStream(t *testing.T) {
	const streams, rotations = 200, 3
	tests := []struct {
		name    string
		perConn int
	}{
		{name: "streams share connections", perConn: 100},
		{name: "connection per stream", perConn: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ca := fanoutCA(t)
			c, path := startFanoutServer(t, ca, nil)
			f := openFanoutStreams(t, path, streams, tc.perConn)
			want := []int64{1}
			for serial := int64(2); serial <= 1+rotations; serial++ {
				s := ca.leaf(t, serial)
				f.arm(serial)
				c.putSVIDs([]*svid{s})
				if err := f.wait(fanoutTimeout); err != nil {
					t.Fatalf("rotation to serial %d: %v", serial, err)
				}
				want = append(want, serial)
			}
			for i := range streams {
				// Exactly want: every new serial, each once, never an
				// older one after a newer one.
				var got []int64
				for _, a := range f.received(i) {
					got = append(got, a.serial)
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("stream %d serials (-want +got):\n%s", i, diff)
				}
			}
		})
	}
}

// BenchmarkRotationFanout1000 measures one rotation (putSVIDs of a new leaf)
// until every open stream has received it, at 100 and 1,000 streams.
// Metrics, over all rotations of a run:
//
//	last-p50-ms, last-p99-ms     when the last stream got it, per rotation
//	stream-p50-ms, stream-p99-ms when each stream got it
//	cpu-ms/rotation              user+sys CPU of the whole process (server and clients)
//
// log=info serves with an Info-level JSON logger writing to /dev/null (the
// agent's default level; the others serve with no logger): the handler
// logs one Info line per stream on its first send, and rotation pushes only
// at Debug, so this case should cost what the others do.
func BenchmarkRotationFanout1000(b *testing.B) {
	tests := []struct {
		streams, perConn int
		logInfo          bool
	}{
		{streams: 100, perConn: 100},
		{streams: 100, perConn: 1},
		{streams: 1000, perConn: 100},
		{streams: 1000, perConn: 1},
		{streams: 1000, perConn: 100, logInfo: true},
	}
	for _, tc := range tests {
		name := fmt.Sprintf("streams=%d/perconn=%d", tc.streams, tc.perConn)
		if tc.logInfo {
			name += "/log=info"
		}
		b.Run(name, func(b *testing.B) {
			var log hclog.Logger
			if tc.logInfo {
				// A real file, so each line costs its write(2) as on stderr.
				null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
				if err != nil {
					b.Fatalf("open %s: %v", os.DevNull, err)
				}
				b.Cleanup(func() { _ = null.Close() })
				log = hclog.New(&hclog.LoggerOptions{Name: "workloadapi", Level: hclog.Info, JSONFormat: true, Output: null})
			}
			benchmarkFanout(b, tc.streams, tc.perConn, log)
		})
	}
}

func benchmarkFanout(b *testing.B, streams, perConn int, log hclog.Logger) {
	ca := fanoutCA(b)
	c, path := startFanoutServer(b, ca, log)
	f := openFanoutStreams(b, path, streams, perConn)
	// Leaves are made up front so neither the clock nor the CPU count
	// includes signing them.
	leaves := make([]*svid, b.N)
	for i := range leaves {
		leaves[i] = ca.leaf(b, int64(i+2))
	}
	starts := make([]time.Time, b.N)

	ru0 := rusage(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		serial := int64(i + 2)
		f.arm(serial)
		starts[i] = time.Now()
		c.putSVIDs(leaves[i : i+1])
		if err := f.wait(fanoutTimeout); err != nil {
			b.Fatalf("rotation %d of %d (%d streams): %v", i+1, b.N, streams, err)
		}
	}
	b.StopTimer()
	ru1 := rusage(b)

	last := make([]time.Duration, b.N) // per rotation, the slowest stream
	each := make([]time.Duration, 0, b.N*streams)
	for s := range streams {
		// Rotation i's serial is stream s's response i+1: the order
		// TestRotationReachesEveryStream checks.
		got := f.received(s)
		for i, t0 := range starts {
			if len(got) <= i+1 || got[i+1].serial != int64(i+2) {
				b.Fatalf("stream %d did not receive serial %d as response %d", s, i+2, i+2)
			}
			d := got[i+1].at.Sub(t0)
			each = append(each, d)
			last[i] = max(last[i], d)
		}
	}
	b.ReportMetric(ms(percentile(last, 0.50)), "last-p50-ms")
	b.ReportMetric(ms(percentile(last, 0.99)), "last-p99-ms")
	b.ReportMetric(ms(percentile(each, 0.50)), "stream-p50-ms")
	b.ReportMetric(ms(percentile(each, 0.99)), "stream-p99-ms")
	b.ReportMetric(ms(ru1-ru0)/float64(b.N), "cpu-ms/rotation")
}

// rusage returns the user+sys CPU time this process has used.
func rusage(tb testing.TB) time.Duration {
	tb.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// percentile returns the nearest-rank p-quantile of ds (sorted in place).
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	rank := int(math.Ceil(float64(len(ds))*p)) - 1
	return ds[min(max(rank, 0), len(ds)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

var unixOnly = func() *attestor.Workload {
	w, err := attestor.New(attestor.Config{Attestors: []string{"unix"}})
	if err != nil {
		panic(err)
	}
	return w
}()

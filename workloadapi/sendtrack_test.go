package workloadapi

import (
	"bytes"
	"encoding/binary"
	"net"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testwait"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/proto"
)

// rawH2 is an HTTP/2 client written frame by frame, so a test can open
// streams and then not read at all, as a hostile client would.
type rawH2 struct {
	t    *testing.T
	conn net.Conn
	fr   *http2.Framer
	next uint32
}

func dialRawH2(t *testing.T, path string) *rawH2 {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return &rawH2{t: t, conn: c, fr: fr, next: 1}
}

// open starts a call of method with an empty request and returns its
// stream ID.
func (r *rawH2) open(method string) uint32 {
	r.t.Helper()
	return r.start("/SpiffeWorkloadAPI/"+method, [][2]string{{securityHeader, "true"}}, nil, true)
}

// start opens a stream on fullMethod with the extra headers, sends msg as
// its one gRPC message, ends the client's side when end is set, and returns
// the stream ID.
func (r *rawH2) start(fullMethod string, extra [][2]string, msg []byte, end bool) uint32 {
	r.t.Helper()
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	fields := append([][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", fullMethod},
		{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"}}, extra...)
	for _, f := range fields {
		if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			r.t.Fatal(err)
		}
	}
	id := r.next
	r.next += 2
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
		r.t.Fatal(err)
	}
	frame := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(frame[1:], uint32(len(msg)))
	if err := r.fr.WriteData(id, end, append(frame, msg...)); err != nil {
		r.t.Fatal(err)
	}
	return id
}

// readMessages opens every window and reads until each stream in want has
// received a message for which done returns true; it returns how many
// messages each stream received.
func (r *rawH2) readMessages(streams []uint32, done func([]byte) bool) map[uint32]int {
	r.t.Helper()
	if err := r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}); err != nil {
		r.t.Fatal(err)
	}
	if err := r.fr.WriteWindowUpdate(0, 1<<30); err != nil {
		r.t.Fatal(err)
	}
	_ = r.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	bufs := map[uint32][]byte{}
	counts := map[uint32]int{}
	waiting := map[uint32]bool{}
	for _, id := range streams {
		waiting[id] = true
	}
	for len(waiting) > 0 {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.t.Fatalf("read frame with %d streams still waiting: %v", len(waiting), err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = r.fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() && waiting[f.StreamID] {
				r.t.Fatalf("stream %d ended: %v", f.StreamID, f.Fields)
			}
		case *http2.DataFrame:
			b := append(bufs[f.StreamID], f.Data()...)
			for len(b) >= 5 && len(b) >= 5+int(binary.BigEndian.Uint32(b[1:5])) {
				n := 5 + int(binary.BigEndian.Uint32(b[1:5]))
				counts[f.StreamID]++
				if done(b[5:n]) {
					delete(waiting, f.StreamID)
				}
				b = b[n:]
			}
			bufs[f.StreamID] = b
		}
	}
	return counts
}

// bigResponse is a response of 16 SVIDs (~18 KiB), so that gRPC's 64 KiB
// per-stream queue holds only a few and the test needs few rotations.
func bigResponse(t *testing.T, ca *testCA) *workload.X509SVIDResponse {
	r := ca.svidResponse(t, "/web")
	for range 15 {
		r.Svids = append(r.Svids, ca.svidResponse(t, "/web").Svids[0])
	}
	return r
}

func heapInUse() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestNonReadingStreamsCoalesce reproduces streams that never read across
// rotations. Before, each stream queued a response per rotation up to
// gRPC's 64 KiB quota (~1 GB for 20,000 streams); now each holds at most
// one, and when the client reads at last it gets the latest state, not
// the history.
func TestNonReadingStreamsCoalesce(t *testing.T) {
	const streams, rotations = 300, 10
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), bigResponse(t, ca))
	rec := newRecorder()
	counted := &countingSource{fakeSource: src}
	srv := startServerWith(t, Config{SocketPath: filepath.Join(socketDir(t), "w.sock"), Attestor: unixOnly, Source: counted, Observer: rec})

	c := dialRawH2(t, srv.path)
	ids := make([]uint32, 0, streams)
	for range streams {
		ids = append(ids, c.open("FetchX509SVID"))
	}
	rec.waitOpen(t, streams)
	base := heapInUse()
	var latest *workload.X509SVIDResponse
	for range rotations {
		latest = bigResponse(t, ca)
		before := counted.rotate(uidSelector(), latest)
		// Each stream either fetches the new state or holds it back until
		// its last push has left. (Before, a stream blocked in Send, its
		// 64 KiB full, did neither, and this wait failed.)
		testwait.For(t, 10*time.Second, "every stream fetched the rotation or is held", func() bool {
			return int(counted.fetches.Load()-before)+int(srv.server.limits.parked.Load()) == streams
		})
	}
	grown := int64(heapInUse()) - int64(base)
	size := proto.Size(latest)
	// One response queued per stream, plus slack for the garbage
	// collector's view; before, ~3.6 per stream (64 KiB of 18 KiB).
	if limit := int64(streams * size * 2); grown > limit {
		t.Errorf("heap grew %d KiB over %d rotations of %d non-reading streams, want at most %d KiB (two responses per stream)",
			grown>>10, rotations, streams, limit>>10)
	}
	want := latest.Svids[0].X509Svid
	counts := c.readMessages(ids, func(msg []byte) bool {
		var r workload.X509SVIDResponse
		return proto.Unmarshal(msg, &r) == nil && len(r.Svids) > 0 && bytes.Equal(r.Svids[0].X509Svid, want)
	})
	for _, id := range ids {
		// The first response, at most one queued while the client did not
		// read, and the latest.
		if counts[id] > 3 {
			t.Errorf("stream %d received %d responses over %d rotations, want at most 3 (first, one queued, latest)", id, counts[id], rotations)
		}
	}
}

// countingSource counts X.509-SVID fetches. A fetch is counted in the
// same critical section as the read it counts, and rotate changes the
// state in one too, so the count rotate returns splits the fetches
// exactly: those it includes read the old state (and a channel the
// rotation closes), every later one read the new state. Counted on entry
// instead, a fetch that waited for the source's lock while the test took
// its count read the new state yet counted as an old one, and the test
// waited for a fetch that never came.
type countingSource struct {
	*fakeSource
	countMu sync.Mutex // orders each count and its read against rotate
	fetches atomic.Int64
}

func (s *countingSource) X509SVIDResponse(selectors []string) (*workload.X509SVIDResponse, <-chan struct{}) {
	s.countMu.Lock()
	defer s.countMu.Unlock()
	s.fetches.Add(1)
	return s.fakeSource.X509SVIDResponse(selectors)
}

// rotate sets selector's response to r, and returns how many fetches read
// the state before it.
func (s *countingSource) rotate(selector string, r *workload.X509SVIDResponse) int64 {
	s.countMu.Lock()
	defer s.countMu.Unlock()
	s.fakeSource.set(selector, r)
	return s.fetches.Load()
}

// TestSendTracker feeds the tracker frames as a server writes them, cut
// into chunks of every size, and checks when each message counts as
// written: only once its last byte has gone, whatever the framing.
func TestSendTracker(t *testing.T) {
	msg := func(n int) []byte {
		b := make([]byte, 5+n)
		binary.BigEndian.PutUint32(b[1:5], uint32(n))
		return b
	}
	var hdrs bytes.Buffer
	enc := hpack.NewEncoder(&hdrs)
	block := func(fields ...string) []byte {
		hdrs.Reset()
		for i := 0; i < len(fields); i += 2 {
			_ = enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return bytes.Clone(hdrs.Bytes())
	}
	var wire bytes.Buffer
	fr := http2.NewFramer(&wire, nil)
	_ = fr.WriteSettings()
	// Stream 3 names itself "1" in a HEADERS frame split by a CONTINUATION.
	b := block(":status", "200", "content-type", "application/grpc", trackHeader, "1")
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: b[:3]})
	_ = fr.WriteContinuation(3, true, b[3:])
	// An untracked stream 5 in between, with the same header name reused
	// from the HPACK table.
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: block(":status", "200", trackHeader, "9"), EndHeaders: true})
	_ = fr.WriteData(5, false, msg(10))
	// Message 1 over two frames, the second padded; message 2 of size 0.
	m1 := msg(40)
	_ = fr.WriteData(3, false, m1[:20])
	_ = fr.WriteDataPadded(3, false, append(m1[20:], msg(0)...), make([]byte, 7))
	firstDone := wire.Len() // after message 2
	m3 := msg(100)
	_ = fr.WriteData(3, false, m3[:99])
	partial := wire.Len()
	_ = fr.WriteData(3, false, m3[99:])

	for _, chunk := range []int{1, 2, 7, 9, 64, wire.Len()} {
		t.Run("chunks of "+strconv.Itoa(chunk), func(t *testing.T) {
			tr := newSendTracker(nil)
			o := tr.register()
			for range 3 {
				o.queued()
			}
			written := func() int {
				tr.mu.Lock()
				defer tr.mu.Unlock()
				return o.sentOK
			}
			data := wire.Bytes()
			fed := 0
			feed := func(upto int) {
				for fed < upto {
					n := min(chunk, upto-fed)
					tr.wrote(data[fed : fed+n])
					fed += n
				}
			}
			feed(firstDone)
			if got := written(); got != 2 {
				t.Errorf("after two messages, %d counted written, want 2", got)
			}
			feed(partial)
			if got := written(); got != 2 || o.idle() {
				t.Errorf("with the third message one byte short, %d counted written (idle %v), want 2 and not idle", got, o.idle())
			}
			feed(len(data))
			if !o.idle() || tr.broken {
				t.Errorf("after every byte: idle %v, broken %v; want idle, not broken", o.idle(), tr.broken)
			}
		})
	}
}

// BenchmarkSendTrackerResponse is the tracker's cost for one one-shot
// response as gRPC writes it: HEADERS, one DATA frame, trailers.
func BenchmarkSendTrackerResponse(b *testing.B) {
	var wire bytes.Buffer
	var hdrs bytes.Buffer
	enc := hpack.NewEncoder(&hdrs)
	fr := http2.NewFramer(&wire, nil)
	block := func(fields ...string) []byte {
		hdrs.Reset()
		for i := 0; i < len(fields); i += 2 {
			_ = enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return bytes.Clone(hdrs.Bytes())
	}
	body := make([]byte, 5+1500)
	binary.BigEndian.PutUint32(body[1:5], 1500)
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":status", "200", "content-type", "application/grpc"), EndHeaders: true})
	_ = fr.WriteData(1, false, body)
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("grpc-status", "0", "grpc-message", ""), EndHeaders: true, EndStream: true})
	frames := wire.Bytes()
	tr := newSendTracker(nil)
	b.ReportAllocs()
	for b.Loop() {
		tr.wrote(frames)
	}
	if tr.broken {
		b.Fatal("the tracker could not parse the frames")
	}
}

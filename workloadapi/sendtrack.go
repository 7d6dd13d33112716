package workloadapi

import (
	"context"
	"encoding/binary"
	"strconv"
	"sync"
	"sync/atomic"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Why this file exists: grpc-go's stream.Send returns as soon as the
// message is queued, and blocks only once the stream has 64 KiB queued
// (its per-stream write quota, replenished when the connection's writer
// puts bytes on the socket, which the client's flow-control window
// allows only as fast as it reads). A client that never reads thus makes
// the agent hold up to 64 KiB of encoded responses per stream, one per
// rotation: ~1 GB for 20,000 streams. gRPC exposes neither the quota nor
// the HTTP/2 stream ID, so the agent watches the frames it writes to the
// socket itself: each push stream names itself in a response header
// (trackHeader), which binds it to its HTTP/2 stream ID, and the DATA
// frames of that stream say when each of its messages has left the
// process. A stream sends its next message only once the previous one has
// left, and sends then the latest state: a non-reading client costs one
// queued response per stream, whatever the number of rotations.

// trackHeader is the response header that binds a push stream to its
// HTTP/2 stream ID; its value is a number unique on the connection.
const trackHeader = "lanyard-stream"

// Frame types and flags of RFC 9113 that the tracker reads.
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRSTStream    = 0x3
	frameContinuation = 0x9

	flagEndStream  = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20
)

// maxHeaderBlock bounds the header block the tracker buffers. The agent
// writes small header blocks; one larger than this stops tracking on the
// connection (streams then fall back to gRPC's own quota) rather than grow.
const maxHeaderBlock = 64 << 10

// sendTracker follows the HTTP/2 frames the server writes on one
// connection. Its zero value is not usable; see newSendTracker.
type sendTracker struct {
	mu      sync.Mutex
	broken  bool // the byte stream did not parse: waits return at once
	next    uint64
	pending map[string]*streamOut // by trackHeader value, until bound
	bound   map[uint32]*streamOut // by HTTP/2 stream ID
	parked  *atomic.Int64         // streams waiting in drained, server-wide

	// The frame being parsed.
	hdr       [9]byte
	hdrN      int
	left      int // payload bytes of the current frame not yet seen
	typ       byte
	flags     byte
	sid       uint32
	padLeft   int  // DATA: trailing padding bytes to skip
	needPad   bool // DATA: the pad length byte is next
	block     []byte
	blockSID  uint32
	blockEnd  bool // the header block ends the stream
	dec       *hpack.Decoder
	frameHead []byte // HEADERS: pad length and priority bytes to strip
}

func newSendTracker(parked *atomic.Int64) *sendTracker {
	dec := hpack.NewDecoder(4096, nil)
	dec.SetAllowedMaxDynamicTableSize(1 << 16)
	dec.SetMaxStringLength(maxHeaderBlock)
	return &sendTracker{pending: map[string]*streamOut{}, bound: map[uint32]*streamOut{}, parked: parked, dec: dec}
}

// streamOut counts the messages one push stream has queued and the ones
// that have been written to the socket.
type streamOut struct {
	t      *sendTracker
	key    string
	sid    uint32
	sent   int  // messages handed to gRPC (under t.mu)
	sentOK int  // messages fully written to the socket (under t.mu)
	off    bool // not tracked: waits return at once (under t.mu)
	// notify gets a token when a message has been written.
	notify chan struct{}

	// The gRPC message being written: 5-byte prefix, then its body.
	prefix  [5]byte
	prefixN int
	bodyN   uint32
}

// register starts tracking a new push stream.
func (t *sendTracker) register() *streamOut {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.next++
	o := &streamOut{t: t, key: strconv.FormatUint(t.next, 10), notify: make(chan struct{}, 1)}
	t.pending[o.key] = o
	return o
}

// unregister stops tracking o.
func (o *streamOut) unregister() {
	o.t.mu.Lock()
	defer o.t.mu.Unlock()
	delete(o.t.pending, o.key)
	if o.sid != 0 && o.t.bound[o.sid] == o {
		delete(o.t.bound, o.sid)
	}
}

// queued records that a message is about to be handed to gRPC.
func (o *streamOut) queued() {
	o.t.mu.Lock()
	o.sent++
	o.t.mu.Unlock()
}

// idle reports whether every message queued so far has been written (or
// tracking is off).
func (o *streamOut) idle() bool {
	o.t.mu.Lock()
	defer o.t.mu.Unlock()
	return o.t.broken || o.off || o.sentOK >= o.sent
}

// drained waits until every message queued on o has been written to the
// socket, the call ends, or stop is closed.
func (o *streamOut) drained(ctx context.Context, stop <-chan struct{}) error {
	if o.idle() {
		return nil
	}
	if p := o.t.parked; p != nil {
		p.Add(1)
		defer p.Add(-1)
	}
	for !o.idle() {
		select {
		case <-o.notify:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-stop:
			return errShuttingDown
		}
	}
	return nil
}

// wrote feeds the tracker bytes that were just written to the socket.
func (t *sendTracker) wrote(p []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for len(p) > 0 && !t.broken {
		if t.hdrN < len(t.hdr) {
			n := copy(t.hdr[t.hdrN:], p)
			t.hdrN += n
			p = p[n:]
			if t.hdrN == len(t.hdr) {
				t.startFrame()
			}
			continue
		}
		n := min(t.left, len(p))
		t.payload(p[:n])
		t.left -= n
		p = p[n:]
		if t.left == 0 {
			t.endFrame()
		}
	}
}

func (t *sendTracker) startFrame() {
	h := t.hdr[:]
	t.left = int(h[0])<<16 | int(h[1])<<8 | int(h[2])
	t.typ, t.flags = h[3], h[4]
	t.sid = binary.BigEndian.Uint32(h[5:9]) & 0x7fffffff
	t.needPad = t.typ == frameData && t.flags&flagPadded != 0
	t.padLeft = 0
	t.frameHead = t.frameHead[:0]
	if t.left == 0 {
		t.endFrame()
	}
}

func (t *sendTracker) payload(p []byte) {
	switch t.typ {
	case frameData:
		after := t.left - len(p) // frame bytes after this chunk
		if t.needPad {
			t.needPad = false
			t.padLeft = int(p[0])
			p = p[1:]
		}
		// The padding is the frame's last padLeft bytes.
		body := max(0, len(p)-max(0, t.padLeft-after))
		if o := t.bound[t.sid]; o != nil {
			o.data(p[:body])
		}
	case frameHeaders, frameContinuation:
		if len(t.block)+len(p) > maxHeaderBlock {
			t.fail()
			return
		}
		t.block = append(t.block, p...)
	}
}

func (t *sendTracker) endFrame() {
	t.hdrN = 0
	switch t.typ {
	case frameData:
		if t.flags&flagEndStream != 0 {
			t.unbind(t.sid)
		}
	case frameHeaders:
		t.blockSID, t.blockEnd = t.sid, t.flags&flagEndStream != 0
		// Strip what RFC 9113 §6.2 puts around the fragment.
		b := t.block
		pad := 0
		if t.flags&flagPadded != 0 {
			if len(b) < 1 {
				t.fail()
				return
			}
			pad, b = int(b[0]), b[1:]
		}
		if t.flags&flagPriority != 0 {
			if len(b) < 5 {
				t.fail()
				return
			}
			b = b[5:]
		}
		if pad > len(b) {
			t.fail()
			return
		}
		t.block = append(t.block[:0], b[:len(b)-pad]...)
		fallthrough
	case frameContinuation:
		if t.flags&flagEndHeaders != 0 {
			t.headerBlock()
		}
	case frameRSTStream:
		t.unbind(t.sid)
	}
}

// headerBlock decodes a complete header block (keeping the HPACK table in
// step with the server's encoder) and binds the stream it names.
func (t *sendTracker) headerBlock() {
	fields, err := t.dec.DecodeFull(t.block)
	t.block = t.block[:0]
	if err != nil {
		t.fail()
		return
	}
	for _, f := range fields {
		if f.Name != trackHeader {
			continue
		}
		if o := t.pending[f.Value]; o != nil {
			delete(t.pending, f.Value)
			o.sid = t.blockSID
			t.bound[o.sid] = o
		}
	}
	if t.blockEnd {
		t.unbind(t.blockSID)
	}
}

func (t *sendTracker) unbind(sid uint32) {
	if o := t.bound[sid]; o != nil {
		delete(t.bound, sid)
		o.sentOK = o.sent // nothing more will be written: release waiters
		o.wake()
	}
}

// fail stops tracking on the connection: every wait returns at once, and
// streams are bounded by gRPC's own write quota only.
func (t *sendTracker) fail() {
	t.broken = true
	t.block = nil
	for _, o := range t.bound {
		o.wake()
	}
	for _, o := range t.pending {
		o.wake()
	}
}

// data consumes DATA payload of o's stream: gRPC length-prefixed messages.
func (o *streamOut) data(p []byte) {
	for len(p) > 0 {
		if o.prefixN < len(o.prefix) {
			n := copy(o.prefix[o.prefixN:], p)
			o.prefixN += n
			p = p[n:]
			if o.prefixN == len(o.prefix) {
				o.bodyN = binary.BigEndian.Uint32(o.prefix[1:])
				if o.bodyN == 0 {
					o.message()
				}
			}
			continue
		}
		n := min(int(o.bodyN), len(p))
		o.bodyN -= uint32(n)
		p = p[n:]
		if o.bodyN == 0 {
			o.message()
		}
	}
}

func (o *streamOut) message() {
	o.prefixN = 0
	o.sentOK++
	o.wake()
}

func (o *streamOut) wake() {
	select {
	case o.notify <- struct{}{}:
	default:
	}
}

// trackedStream is a push stream whose SendMsg waits until its previous
// message has left the process.
type trackedStream struct {
	grpc.ServerStream
	ctx   context.Context
	out   *streamOut
	stop  <-chan struct{}
	named bool
}

// Context carries out, so the handler can wait for it before it picks the
// state to push (see waitSent).
func (s *trackedStream) Context() context.Context { return s.ctx }

// SendMsg sends m once the previous message has been written.
func (s *trackedStream) SendMsg(m any) error {
	if err := s.out.drained(s.ctx, s.stop); err != nil {
		return err
	}
	if !s.named {
		s.named = true
		// Sent with the first message's headers. Should it fail (a handler
		// that sent its headers itself), the stream is simply not tracked.
		if err := s.ServerStream.SetHeader(metadata.Pairs(trackHeader, s.out.key)); err != nil {
			s.out.unregister()
			s.out.t.mu.Lock()
			s.out.off = true
			s.out.t.mu.Unlock()
		}
	}
	s.out.queued()
	return s.ServerStream.SendMsg(m)
}

type outKey struct{}

// waitSent waits until the push stream of ctx has written everything it
// queued, so that what it sends next is the state at that moment: pushes
// coalesce while a client does not read. Other calls return at once.
func waitSent(ctx context.Context, stop <-chan struct{}) error {
	if o, ok := ctx.Value(outKey{}).(*streamOut); ok {
		return o.drained(ctx, stop)
	}
	return nil
}

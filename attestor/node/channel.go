package node

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
)

const (
	// tpmHeaderSize is the size of a TPM 2.0 response header: tag (2),
	// responseSize (4), responseCode (4).
	tpmHeaderSize = 10
	// tpmBufferSize is the usual TPM_PT_MAX_RESPONSE_SIZE and the kernel's
	// TPM_BUFSIZE: a device hands back every response in one read this big.
	tpmBufferSize = 4096
	// maxTPMResponse bounds the size field a peer may announce, so a broken
	// socket peer cannot make us allocate gigabytes.
	maxTPMResponse = 1 << 16
)

// errNoEventLog is what MeasurementLog answers: Lanyard attests the TPM's
// identity, not the boot state, so it never reads the event log.
var errNoEventLog = errors.New("attestor: no event log over a TPM command channel")

// framedChannel carries the raw TPM 2.0 command stream over a byte stream and
// hands go-tpm each response whole. go-tpm writes a command and then reads the
// response with a single Read; a Unix socket may deliver that response in
// fragments, so we read the header, take its size field and read the rest
// before answering. A TPM character device returns the whole response in one
// read, which the same loop accepts without a second read.
type framedChannel struct {
	rw      io.ReadWriteCloser
	name    string // "socket /run/swtpm/tpm.sock", for error messages
	buf     []byte
	pending []byte // the unread part of the last response

	// broken is the first I/O error, kept for good: a stream that failed
	// mid-command is out of step with the TPM (or the TPM is gone, as
	// when swtpm dies), so every later command fails with it at once and
	// only a new channel helps. Set and read under the TPM's mutex, like
	// every other use of the channel; atomic so that TPM.Err can look
	// without waiting behind a long command.
	broken atomic.Pointer[error]
}

// newFramedChannel wraps rw; name says what rw is, for errors.
func newFramedChannel(rw io.ReadWriteCloser, name string) *framedChannel {
	return &framedChannel{rw: rw, name: name, buf: make([]byte, tpmBufferSize)}
}

// Write sends one command. Whatever is left of an earlier response is
// dropped: it answers a command nobody waits for any more.
func (c *framedChannel) Write(p []byte) (int, error) {
	c.pending = nil
	if err := c.err(); err != nil {
		return 0, err
	}
	n, err := c.rw.Write(p)
	if err != nil {
		return n, c.fail(fmt.Errorf("write TPM command to %s: %w", c.name, err))
	}
	return n, nil
}

// Read returns the response to the last command, reading all of it from the
// stream first when nothing is pending.
func (c *framedChannel) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		if err := c.err(); err != nil {
			return 0, err
		}
		resp, err := c.readResponse()
		if err != nil {
			return 0, c.fail(fmt.Errorf("read TPM response from %s: %w", c.name, err))
		}
		c.pending = resp
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// err returns the error that broke the channel, or nil.
func (c *framedChannel) err() error {
	if p := c.broken.Load(); p != nil {
		return *p
	}
	return nil
}

// fail marks the channel broken by err (the first failure wins) and
// returns the error every caller gets from now on: ErrTPMUnreachable
// with the cause.
func (c *framedChannel) fail(err error) error {
	wrapped := fmt.Errorf("%w: %w", ErrTPMUnreachable, err)
	c.broken.CompareAndSwap(nil, &wrapped)
	return c.err()
}

// readResponse reads exactly one response: at least the header (in as many
// reads as the stream needs, the first one large enough for a whole
// response), then the rest announced by the header's size field.
func (c *framedChannel) readResponse() ([]byte, error) {
	n, err := io.ReadAtLeast(c.rw, c.buf, tpmHeaderSize)
	if err != nil {
		return nil, err
	}
	size := int(binary.BigEndian.Uint32(c.buf[2:6]))
	switch {
	case size < tpmHeaderSize || size > maxTPMResponse:
		return nil, fmt.Errorf("response header announces %d bytes", size)
	case n > size:
		return nil, fmt.Errorf("got %d bytes for a %d-byte response", n, size)
	}
	if size > len(c.buf) {
		grown := make([]byte, size)
		copy(grown, c.buf[:n])
		c.buf = grown
	}
	if _, err := io.ReadFull(c.rw, c.buf[n:size]); err != nil {
		return nil, err
	}
	return c.buf[:size], nil
}

// Close closes the underlying stream.
func (c *framedChannel) Close() error {
	return c.rw.Close()
}

// MeasurementLog is part of attest.CommandChannelTPM20; Lanyard has no use
// for the event log, and a socket cannot carry one.
func (c *framedChannel) MeasurementLog() ([]byte, error) {
	return nil, fmt.Errorf("%w (%s)", errNoEventLog, c.name)
}

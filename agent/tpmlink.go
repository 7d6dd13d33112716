package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/rotator"
)

// Defaults of the tpm block's tuning fields (README "Configuration").
const (
	// DefaultTPMProbeInterval is how often an idle TPM is asked one cheap
	// question, so that a TPM that went away (swtpm killed, device gone)
	// shows in status within seconds even when nothing needed it. One
	// property read every 5 s is nothing even for a slow hardware TPM.
	DefaultTPMProbeInterval = 5 * time.Second
	// DefaultTPMReopenMax caps the wait between attempts to open a lost
	// TPM again. An attempt is one connect() or open() that fails at once
	// while the TPM is away, so a short cap costs nothing and bounds how
	// long after the TPM's return the agent is back: within 2 s.
	DefaultTPMReopenMax = 2 * time.Second
)

// tpmLink keeps the agent's TPM open. The TPM behind a socket is another
// process (swtpm) that can die and come back, and a device can fail; its
// command stream then breaks for good (node.ErrTPMUnreachable). The
// link notices, from a failed operation or from a periodic probe, closes
// the dead TPM and opens it again with backoff. The keys of the old
// sessions (the agent's TLS key among them) died with it, so every reopen
// is followed by a new attestation (reopened).
type tpmLink struct {
	open     func() (*node.TPM, error)
	backoff  rotator.Backoff // between reopen attempts
	probe    time.Duration   // between probes of a TPM nobody reported lost
	log      hclog.Logger
	reopened func() // called after each successful reopen
	rand     func() float64

	wake chan struct{} // an operation failed on a broken TPM: look now

	mu       sync.Mutex
	tpm      *node.TPM // nil while unreachable
	lost     error     // why it is unreachable (the latest reopen error)
	lostAt   time.Time // when it was found unreachable
	failures int       // failed reopen attempts since then
}

// tpmState is the link's state for the status report.
type tpmState struct {
	Reachable      bool
	Error          string    // why not, when not reachable
	LostAt         time.Time // zero while reachable
	ReopenFailures int
}

// newTPMLink returns a link holding tpm, already open, that reopens it
// with open when it breaks.
func newTPMLink(tpm *node.TPM, open func() (*node.TPM, error), log hclog.Logger) *tpmLink {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &tpmLink{
		open: open, tpm: tpm, log: log,
		backoff:  rotator.Backoff{Base: 250 * time.Millisecond, Max: DefaultTPMReopenMax},
		probe:    DefaultTPMProbeInterval,
		reopened: func() {},
		rand:     func() float64 { return 0.5 },
		wake:     make(chan struct{}, 1),
	}
}

// current returns the open TPM, or an error wrapping
// node.ErrTPMUnreachable while there is none.
func (l *tpmLink) current() (*node.TPM, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.tpm == nil {
		return nil, fmt.Errorf("%w (since %s): %w", node.ErrTPMUnreachable, l.lostAt.UTC().Format(time.RFC3339), l.lost)
	}
	return l.tpm, nil
}

// check is called after an operation on tpm failed: if the TPM's stream
// broke, the link reopens it now rather than at the next probe.
func (l *tpmLink) check(tpm *node.TPM) {
	if tpm.Err() == nil {
		return
	}
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// Snapshot reports whether the TPM is reachable, for status.
func (l *tpmLink) Snapshot() tpmState {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.tpm != nil {
		return tpmState{Reachable: true}
	}
	return tpmState{Error: l.lost.Error(), LostAt: l.lostAt, ReopenFailures: l.failures}
}

// Run watches the TPM until ctx ends, reopening it whenever it is lost.
// It closes the TPM it holds when it returns.
func (l *tpmLink) Run(ctx context.Context) error {
	defer l.close()
	probe := time.NewTicker(l.probe)
	defer probe.Stop()
	for {
		select {
		case <-probe.C:
		case <-l.wake:
		case <-ctx.Done():
			return nil
		}
		l.mu.Lock()
		tpm := l.tpm
		l.mu.Unlock()
		err := tpm.Err()
		if err == nil {
			err = tpm.Probe()
		}
		if !errors.Is(err, node.ErrTPMUnreachable) {
			if err != nil {
				// The TPM answered, with a refusal: it is there.
				l.log.Warn("TPM probe refused", "error", err)
			}
			continue
		}
		l.lose(tpm, err)
		if !l.reopen(ctx) {
			return nil
		}
		probe.Reset(l.probe)
	}
}

// lose drops a TPM whose stream broke.
func (l *tpmLink) lose(tpm *node.TPM, err error) {
	l.mu.Lock()
	l.tpm, l.lost, l.lostAt, l.failures = nil, err, time.Now(), 0
	l.mu.Unlock()
	// Closing a broken channel only releases the fd; its error says
	// nothing new.
	_ = tpm.Close()
	l.log.Error("TPM unreachable; reopening it", "error", err)
}

// reopen opens the TPM again, with backoff, until it succeeds (true) or
// ctx ends (false).
func (l *tpmLink) reopen(ctx context.Context) bool {
	for {
		tpm, err := l.open()
		if err == nil {
			l.mu.Lock()
			l.tpm = tpm
			down, failures := time.Since(l.lostAt), l.failures
			l.lost, l.lostAt, l.failures = nil, time.Time{}, 0
			l.mu.Unlock()
			l.log.Info("TPM reopened", "down_ms", down.Milliseconds(), "failed_attempts", failures)
			l.reopened()
			return true
		}
		l.mu.Lock()
		l.failures++
		l.lost = err
		failures := l.failures
		l.mu.Unlock()
		d := l.backoff.Delay(failures, l.rand())
		l.log.Warn("TPM reopen failed", "error", err, "failures", failures, "retry_in", d.String())
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return false
		}
	}
}

// close closes the TPM held, if any.
func (l *tpmLink) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.tpm != nil {
		_ = l.tpm.Close()
		l.tpm = nil
		l.lost, l.lostAt = node.ErrTPMClosed, time.Now()
	}
}

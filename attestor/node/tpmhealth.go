package node

import (
	"fmt"

	"github.com/google/go-tpm/legacy/tpm2"
)

// Err reports whether the TPM's command stream failed (swtpm died, the
// device failed): an error wrapping ErrTPMUnreachable, or nil. It never
// waits for a command in progress, so a status page can call it at any
// time. go-tpm
// and go-attestation do not always wrap the errors they pass on, so after
// a failed operation this, not errors.Is on that operation's error, is how
// a caller tells a dead TPM from a refused command.
func (t *TPM) Err() error {
	return t.ch.err()
}

// Probe sends the TPM one cheap command (read one property), so that a
// TPM that went away while nobody used it is noticed. It returns Err's
// answer when the stream has failed, or the TPM's refusal.
func (t *TPM) Probe() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrTPMClosed
	}
	_, _, err := tpm2.GetCapability(t.ch, tpm2.CapabilityTPMProperties, 1, uint32(tpm2.Manufacturer))
	if cerr := t.ch.err(); cerr != nil {
		return cerr
	}
	if err != nil {
		return fmt.Errorf("attestor: probe TPM: %w", err)
	}
	return nil
}

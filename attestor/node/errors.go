package node

import (
	"errors"
	"fmt"
)

// Refusals of the TPM node verifier. NewChallenge and Challenge.Verify wrap
// exactly one of them (with %w and a detail naming the EK hash and the step),
// so the signer can log the reason and pick its status code with errors.Is.
// No message ever holds the activation secret, a key or a CSR.
var (
	// ErrMalformedEvidence means the evidence could not be decoded: a missing
	// or unparsable EK, an EK certificate whose key differs from EKPublic, an
	// unparsable CSR.
	ErrMalformedEvidence = errors.New("attestor: malformed TPM evidence")
	// ErrUnknownEK means no node rule pins the EK and no rule names an ek_ca.
	ErrUnknownEK = errors.New("attestor: EK is not pinned by any node rule")
	// ErrEKCertMissing means the EK is not pinned, some rule would accept an
	// EK certificate chaining to its ek_ca, but the TPM has no EK certificate.
	ErrEKCertMissing = errors.New("attestor: EK is not pinned and the TPM has no EK certificate")
	// ErrEKCertUntrusted means the EK is not pinned and its certificate
	// chains to no ek_ca of any rule.
	ErrEKCertUntrusted = errors.New("attestor: EK certificate chains to no trusted ek_ca")
	// ErrAKInvalid means the attestation key is not a restricted,
	// TPM-generated key, or its creation attestation does not verify.
	ErrAKInvalid = errors.New("attestor: attestation key is not a valid TPM attestation key")
	// ErrKeyNotCertified means the signing key's certification does not
	// verify against the AK (wrong signer, tampered data, unsuitable key).
	ErrKeyNotCertified = errors.New("attestor: signing key is not certified by the attestation key")
	// ErrCSRKeyMismatch means the CSR is not for, or not signed by, the key
	// the AK certified.
	ErrCSRKeyMismatch = errors.New("attestor: CSR key is not the certified TPM key")
	// ErrActivationMismatch means the TPM's answer to the credential
	// activation challenge is wrong: the AK does not live in the TPM that
	// holds the EK, or the answer belongs to another challenge.
	ErrActivationMismatch = errors.New("attestor: credential activation answer does not match")
	// ErrChallengeUsed means the challenge was already answered once; every
	// challenge takes exactly one answer, right or wrong.
	ErrChallengeUsed = errors.New("attestor: challenge already answered")
)

// ErrTPMClosed is returned by TPM and Session operations that need the TPM
// after TPM.Close.
var ErrTPMClosed = errors.New("attestor: TPM is closed")

// ErrTPMUnreachable means the command stream to the TPM failed: the swtpm
// behind a socket died or restarted, or the device returned an I/O error.
// The TPM stays unusable (TPM.Err says why) until it is opened again, and
// the keys of its sessions, held as blobs of the old connection, go with it.
var ErrTPMUnreachable = errors.New("attestor: TPM unreachable")

// refuse wraps a sentinel with a detail. The detail must hold public facts
// only (EK hash, rule names, parser messages).
func refuse(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)
}

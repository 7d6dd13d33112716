// Package node is TPM node attestation, from EK to SVID: how the agent
// proves which machine it runs on, and how the signer checks the proof.
// (attestor/workload answers the other "who is this?": which process calls
// the agent.)
//
// The two halves share the Evidence type and nothing else:
//
//   - The agent half (TPM, Session) talks to the TPM. OpenTPM opens
//     /dev/tpmrm0 or a swtpm socket; NewSession creates, inside the TPM, an
//     attestation key (AK) and an ECDSA P-256 signing key the AK certifies;
//     Session.Evidence gathers the endorsement key (EK, with its certificate
//     when the TPM has one), the AK's creation attestation, the key's
//     certification and a CSR signed by the key; Session.Activate answers
//     the signer's challenge, once. The signing key never leaves the TPM:
//     Session.Signer is the agent's TLS client key. Between operations no
//     object stays loaded (see Session), so renewals never exhaust the TPM's
//     few object slots.
//   - The verifier half (NewChallenge, Challenge.Verify, Node.Rematch) is a
//     pure function of evidence, policy (Rule), randomness and time, used by
//     the signer. It accepts an EK pinned by its SHA-256 or one whose
//     certificate chains to a manufacturer CA, checks the AK and the key
//     certification, and challenges with credential activation: only the TPM
//     holding that EK can recover the secret, and only if it also holds the
//     AK. Each refusal is its own error value (ErrUnknownEK, ...).
//
// Renewal is a new attestation: cheap, and it re-proves the hardware. The
// package exceeds the ~800-line guideline because it holds both halves of
// one protocol, whose types (Evidence, the EK hash) must not drift apart;
// each file stays small.
package node

// Package attestor answers "who is this?" for Lanyard: which process is
// calling the agent (workload attestation, from the kernel's facts about the
// caller) and which machine the agent runs on (TPM node attestation).
//
// Workload attestation (NewWorkload, Workload.Attest) turns a Workload API
// caller, pinned by a pidfd when its connection was accepted (Process),
// into selectors: unix:* from the kernel's ids and /proc/<pid>/exe (path
// and a cached SHA-256), systemd:unit, cgroup:path, container:id and
// k8s:pod-uid from /proc/<pid>/cgroup (ParseCgroup). Each family comes from
// a small attestor type that WorkloadConfig switches on or off. Attest reads
// /proc first and asks the pidfd last whether the caller still lives, so a
// PID recycled meanwhile cannot lend another process's selectors.
//
// TPM node attestation, from EK to SVID, has two halves that share the
// Evidence type and nothing else:
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
//   - The verifier half (NewChallenge, Challenge.Verify) is a pure function
//     of evidence, policy (NodeRule), randomness and time, used by the
//     signer. It accepts an EK pinned by its SHA-256 or one whose
//     certificate chains to a manufacturer CA, checks the AK and the key
//     certification, and challenges with credential activation: only the TPM
//     holding that EK can recover the secret, and only if it also holds the
//     AK. Each refusal is its own error value (ErrUnknownEK, ...).
//
// Renewal is a new attestation: cheap, and it re-proves the hardware. The
// package exceeds the ~800-line guideline because it holds both halves of one
// protocol plus workload attestation; each file stays small.
package node

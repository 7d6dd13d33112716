//go:build cgo

package node

import (
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
)

// BenchmarkVerifyAttestation measures the signer's half of one TPM
// attestation: NewChallenge (parse the EK, match the policy rules, check
// the AK and the key certification, make the credential) and Verify (check
// the answer). The TPM's half (making the AK and key, activating the
// credential) runs in the simulator with the timer stopped: on a real host
// it runs on the agent's TPM, not on the signer. 1 / (ns/op) is
// attestations verified per second per core (-cpu 1).
func BenchmarkVerifyAttestation(b *testing.B) {
	sim, err := simulator.Get()
	if err != nil {
		b.Fatalf("start simulator: %v", err)
	}
	tpm, err := OpenTPMChannel(sim)
	if err != nil {
		sim.Close()
		b.Fatalf("OpenTPMChannel: %v", err)
	}
	defer tpm.Close()
	info, err := tpm.Info()
	if err != nil {
		b.Fatalf("Info: %v", err)
	}
	rules := []Rule{{Name: "lab", EKSHA256: []string{info.EKSHA256}}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// A session answers one challenge: a fresh one per attestation,
		// as the agent makes.
		b.StopTimer()
		sess, err := tpm.NewSession()
		if err != nil {
			b.Fatalf("NewSession: %v", err)
		}
		ev, err := sess.Evidence()
		if err != nil {
			b.Fatalf("Evidence: %v", err)
		}
		b.StartTimer()
		ch, err := NewChallenge(ev, rules, nil, time.Now())
		if err != nil {
			b.Fatalf("NewChallenge: %v", err)
		}
		b.StopTimer()
		answer, err := sess.Activate(ch.Credential())
		b.StartTimer()
		if err != nil {
			b.Fatalf("Activate: %v", err)
		}
		node, err := ch.Verify(answer)
		b.StopTimer()
		sess.Close()
		b.StartTimer()
		if err != nil {
			b.Fatalf("Verify: %v", err)
		}
		if node.EKSHA256 != info.EKSHA256 {
			b.Fatalf("verified EK %s, want %s", node.EKSHA256, info.EKSHA256)
		}
	}
}

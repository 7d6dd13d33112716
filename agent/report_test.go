package agent

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestHealth(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	ok := snapshot{up: upstreamSnapshot{AgentID: spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/ab"), AgentNotAfter: now.Add(time.Hour), SyncConnected: true}, tpm: tpmState{Reachable: true}}
	tests := []struct {
		name    string
		mod     func(*snapshot)
		want    string
		reasons []string
	}{
		{"all good", func(*snapshot) {}, Healthy, nil},
		{"not attested", func(s *snapshot) { s.up.AgentID = spiffeid.ID{}; s.up.SyncConnected = false },
			Unhealthy, []string{"not attested", "signer unreachable (sync stream down)"}},
		{"agent SVID expired", func(s *snapshot) { s.up.AgentNotAfter = now }, Unhealthy, []string{"agent SVID expired"}},
		{"entry without SVID", func(s *snapshot) { s.cache.EntriesWithoutID = 2 }, Unhealthy, []string{"2 entries have no valid SVID"}},
		{"signer down, SVIDs valid", func(s *snapshot) { s.up.SyncConnected = false }, Degraded, []string{"signer unreachable (sync stream down)"}},
		{"renewals failing", func(s *snapshot) { s.renew.Failures = 1 }, Degraded, []string{"1 renewal round failed in a row"}},
		{"attestations failing", func(s *snapshot) { s.up.AttestFailures = 3 }, Degraded, []string{"3 attestations failed in a row"}},
		{"attestation refused by the signer", func(s *snapshot) {
			s.up.AgentID, s.up.SyncConnected, s.up.AttestFailures, s.up.EKSHA256 = spiffeid.ID{}, false, 2, "ab12"
			s.up.AttestRefused = "attest: EK certificate chains to no trusted ek_ca"
		}, Unhealthy, []string{"attestation refused by the signer: attest: EK certificate chains to no trusted ek_ca (to admit this TPM, pin EK SHA-256 ab12 in a node block: `lanyard-agent tpm info --config FILE` prints the snippet)",
			"not attested", "2 attestations failed in a row"}},
		{"revoked by the signer", func(s *snapshot) { s.up.Revoked = "host stolen"; s.up.SyncConnected = false },
			Unhealthy, []string{"revoked by the signer: host stolen", "signer unreachable (sync stream down)"}},
		{"TPM unreachable", func(s *snapshot) {
			s.tpm = tpmState{Error: "attestor: TPM unreachable: read TPM response from socket /s: EOF", LostAt: now.Add(-12 * time.Second), ReopenFailures: 4}
			s.up.AttestFailures = 2
		}, Degraded, []string{"TPM unreachable for 12s (4 reopen attempts failed): attestor: TPM unreachable: read TPM response from socket /s: EOF", "2 attestations failed in a row"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := ok
			tt.mod(&st)
			got, reasons := health(st, now)
			if got != tt.want || !slices.Equal(reasons, tt.reasons) {
				t.Errorf("health = %s %q, want %s %q", got, reasons, tt.want, tt.reasons)
			}
		})
	}
}

// TestRevokedReason: only the signer's PermissionDenied "node revoked: "
// refusal, however wrapped, marks the agent revoked.
func TestRevokedReason(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		reason string
		ok     bool
	}{
		{"revoked", status.Error(codes.PermissionDenied, "node revoked: host stolen"), "host stolen", true},
		{"wrapped", fmt.Errorf("attest: signer 127.0.0.1:1: %w", status.Error(codes.PermissionDenied, "node revoked: decommissioned")), "decommissioned", true},
		{"other refusal", status.Error(codes.PermissionDenied, "attestation refused: unknown EK"), "", false},
		{"other code", status.Error(codes.Unauthenticated, "node revoked: x"), "", false},
		{"not a status", errors.New("node revoked: x"), "", false},
	}
	for _, tt := range tests {
		if reason, ok := revokedReason(tt.err); reason != tt.reason || ok != tt.ok {
			t.Errorf("%s: revokedReason = %q, %v; want %q, %v", tt.name, reason, ok, tt.reason, tt.ok)
		}
	}
}

// TestRefusal: only the signer's "no" to an attestation on its merits is
// a refusal an operator must act on; an unreachable signer, a timeout or a
// revocation (reported on its own) is not.
func TestRefusal(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"untrusted EK", fmt.Errorf("attest: %w", status.Error(codes.PermissionDenied, "attestation refused: EK certificate chains to no trusted ek_ca")),
			"attestation refused: EK certificate chains to no trusted ek_ca"},
		{"malformed evidence", status.Error(codes.InvalidArgument, "attest: bad AK"), "attest: bad AK"},
		{"signer down", status.Error(codes.Unavailable, "connection refused"), ""},
		{"timeout", status.Error(codes.DeadlineExceeded, "deadline"), ""},
		{"revoked", status.Error(codes.PermissionDenied, signerpb.RevokedPrefix+"stolen"), ""},
		{"not a gRPC error", errors.New("open TPM: no such file"), ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := refusal(tc.err); got != tc.want {
				t.Errorf("refusal = %q, want %q", got, tc.want)
			}
		})
	}
}

package agent

import (
	"slices"
	"testing"
	"time"
)

func TestHealth(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	ok := Status{AgentID: "spiffe://example.org/lanyard/agent/tpm/ab", AgentNotAfter: now.Add(time.Hour), SyncConnected: true}
	tests := []struct {
		name    string
		mod     func(*Status)
		want    string
		reasons []string
	}{
		{"all good", func(*Status) {}, Healthy, nil},
		{"not attested", func(s *Status) { s.AgentID = ""; s.SyncConnected = false },
			Unhealthy, []string{"not attested", "signer unreachable (sync stream down)"}},
		{"agent SVID expired", func(s *Status) { s.AgentNotAfter = now }, Unhealthy, []string{"agent SVID expired"}},
		{"entry without SVID", func(s *Status) { s.EntriesWithoutID = 2 }, Unhealthy, []string{"2 entries have no valid SVID"}},
		{"signer down, SVIDs valid", func(s *Status) { s.SyncConnected = false }, Degraded, []string{"signer unreachable (sync stream down)"}},
		{"renewals failing", func(s *Status) { s.RenewFailures = 1 }, Degraded, []string{"1 renewal round failed in a row"}},
		{"attestations failing", func(s *Status) { s.AttestFailures = 3 }, Degraded, []string{"3 attestations failed in a row"}},
		{"TPM unreachable", func(s *Status) {
			s.TPMError, s.TPMLostAt, s.TPMReopenFailures, s.AttestFailures = "attestor: TPM unreachable: read TPM response from socket /s: EOF", now.Add(-12*time.Second), 4, 2
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

package agent

import (
	"cmp"
	"fmt"
	"strconv"
	"time"

	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/lanyard-dev/lanyard/workloadapi"
)

// Health states, also the exit codes of `lanyard-agent status` and
// `healthcheck`.
const (
	Healthy   = "healthy"   // exit 0
	Degraded  = "degraded"  // exit 1: serving valid SVIDs, but something needs attention
	Unhealthy = "unhealthy" // exit 2: not attested, or some entry has no valid SVID
)

// Report is the document behind `lanyard-agent status --json`. Its JSON
// field names are a stable interface, documented in the README.
type Report struct {
	Version       string        `json:"version"`
	Health        string        `json:"health"`
	Reasons       []string      `json:"reasons,omitempty"`
	UptimeSeconds int64         `json:"uptime_seconds"`
	Agent         AgentReport   `json:"agent"`
	Signer        SignerReport  `json:"signer"`
	Bundle        []CAReport    `json:"bundle"`
	Entries       []EntryReport `json:"entries"`
	JWT           JWTReport     `json:"jwt"`
	// Federated lists the bundles of foreign trust domains held (SPIFFE
	// federation), by trust domain name; absent when there is none.
	Federated []FederatedReport `json:"federated_bundles,omitempty"`
	// OpenStreams counts open Workload API streams by method; every
	// streaming method is present, 0 when none is open.
	OpenStreams map[string]int64 `json:"open_streams"`
	TPM         TPMReport        `json:"tpm"`
}

// TPMReport is the state of the agent's link to its TPM. While the TPM is
// unreachable the agent serves the SVIDs it holds and keeps renewing them
// on its open signer connection, but cannot attest again: it reopens the
// TPM with backoff and attests on it as soon as it answers.
type TPMReport struct {
	Reachable        bool       `json:"reachable"`
	Error            string     `json:"error,omitempty"` // why not, while unreachable
	UnreachableSince *time.Time `json:"unreachable_since,omitempty"`
	ReopenFailures   int        `json:"reopen_failures"`
}

// JWTReport is the JWT-SVID side: the signing keys tokens are validated
// against, and how many tokens the agent holds for reuse.
type JWTReport struct {
	KeyIDs       []string `json:"key_ids"`
	TokensCached int      `json:"tokens_cached"`
	// Revocations counts the token revocations in force (lanyard-signer
	// token revoke), pushed by the signer and dropped once every token
	// they cover has expired.
	Revocations int `json:"revocations"`
}

// FederatedReport is the bundle of one federated trust domain, as the
// signer last fetched it and pushed it to this agent.
type FederatedReport struct {
	TrustDomain string     `json:"trust_domain"`
	Sequence    uint64     `json:"sequence"` // the domain's spiffe_sequence
	CAs         []CAReport `json:"cas"`
	JWTKeyIDs   []string   `json:"jwt_key_ids"`
}

// AgentReport is the agent's own identity and how it got it.
type AgentReport struct {
	SPIFFEID        string     `json:"spiffe_id,omitempty"`
	NotAfter        *time.Time `json:"not_after,omitempty"`
	RenewAt         *time.Time `json:"renew_at,omitempty"`
	EKSHA256        string     `json:"ek_sha256,omitempty"`
	TPMManufacturer string     `json:"tpm_manufacturer,omitempty"`
	NodeSelectors   []string   `json:"node_selectors,omitempty"`
}

// SignerReport is the state of the agent's link to the signer.
type SignerReport struct {
	// Address is the signer replica in use (the one the agent attested
	// with), or the one being tried before the first attestation.
	Address string `json:"address"`
	// Addresses is signer_address as configured.
	Addresses []string `json:"addresses,omitempty"`
	// Candidates are the replicas the agent can switch to, the configured
	// names resolved at the last selection.
	Candidates []string `json:"candidates,omitempty"`
	// Unreachable lists, oldest first, the replicas the agent could not
	// reach in the last 10 minutes and has not reached since.
	Unreachable []UnreachableReport `json:"unreachable,omitempty"`
	Connected   bool                `json:"connected"`
	LastSync    *time.Time          `json:"last_sync,omitempty"`
	// Since is when the sync stream came up (Connected) or went down (or
	// the agent started, when it never came up).
	Since               *time.Time `json:"since,omitempty"`
	ConsecutiveFailures int        `json:"consecutive_failures"`
}

// UnreachableReport is a signer replica the agent could not reach.
type UnreachableReport struct {
	Address string    `json:"address"`
	Error   string    `json:"error"`
	At      time.Time `json:"at"` // the last failure
}

// CAReport is one trust bundle authority.
type CAReport struct {
	NotAfter time.Time `json:"not_after"`
}

// EntryReport is one workload entry the node serves and the SVID held for it.
type EntryReport struct {
	ID       string     `json:"id"`
	SPIFFEID string     `json:"spiffe_id"`
	Serial   string     `json:"serial,omitempty"`
	NotAfter *time.Time `json:"not_after,omitempty"`
	RenewAt  *time.Time `json:"renew_at,omitempty"`
}

// snapshot is what the parts report, each read under its own lock only:
// the facts behind Report and health.
type snapshot struct {
	started     time.Time
	up          upstreamSnapshot
	replicas    replicaSnapshot
	renew       renewerSnapshot
	cache       cacheSnapshot
	tpm         tpmState
	jwtTokens   int
	revocations int              // token revocations in force
	openStreams map[string]int64 // open Workload API streams by method
	// exhaustion lists the Workload API limits callers reached now or
	// within the last minute, and failed accepts.
	exhaustion []workloadapi.Exhaustion
}

// snapshot reads every part's snapshot.
func (a *Agent) snapshot(now time.Time) snapshot {
	s := snapshot{
		started: a.started, up: a.up.Snapshot(), replicas: a.up.replicas.snapshot(now), renew: a.renew.Snapshot(), cache: a.cache.snapshot(a.renew.sched),
		jwtTokens: a.jwt.cached(), revocations: a.tokens.Revocations(now), openStreams: a.metrics.openStreams(), tpm: tpmState{Reachable: true},
	}
	if a.api != nil {
		s.exhaustion = a.api.Exhaustion(now)
	}
	if a.tpm != nil {
		s.tpm = a.tpm.Snapshot()
	}
	return s
}

// Report builds the status report at now.
func (a *Agent) Report(now time.Time) Report {
	st := a.snapshot(now)
	r := Report{
		Version:       cli.Version(),
		UptimeSeconds: int64(now.Sub(st.started).Seconds()),
		Agent: AgentReport{
			NotAfter: timePtr(st.up.AgentNotAfter), RenewAt: timePtr(st.up.AgentRenewAt),
			EKSHA256: st.up.EKSHA256, TPMManufacturer: a.tpmManufacturer, NodeSelectors: st.up.NodeSelectors,
		},
		Signer: SignerReport{
			Address: st.replicas.Address, Addresses: st.replicas.Configured, Candidates: st.replicas.Candidates,
			Unreachable: st.replicas.Unreachable, Connected: st.up.SyncConnected, LastSync: timePtr(st.up.LastSync),
			Since:               timePtr(cmp.Or(st.up.SyncSince, st.started)),
			ConsecutiveFailures: max(st.up.SyncFailures, st.up.AttestFailures, st.renew.Failures),
		},
		OpenStreams: st.openStreams,
		TPM: TPMReport{Reachable: st.tpm.Reachable, Error: st.tpm.Error, UnreachableSince: timePtr(st.tpm.LostAt),
			ReopenFailures: st.tpm.ReopenFailures},
	}
	if !st.up.AgentID.IsZero() {
		r.Agent.SPIFFEID = st.up.AgentID.String()
	}
	for _, na := range st.cache.BundleNotAfter {
		r.Bundle = append(r.Bundle, CAReport{NotAfter: na})
	}
	for _, s := range st.cache.SVIDs {
		r.Entries = append(r.Entries, EntryReport{ID: s.EntryID, SPIFFEID: s.SPIFFEID, Serial: s.Serial,
			NotAfter: timePtr(s.NotAfter), RenewAt: timePtr(s.RenewAt)})
	}
	r.JWT = JWTReport{KeyIDs: st.cache.JWTKeyIDs, TokensCached: st.jwtTokens, Revocations: st.revocations}
	for _, f := range st.cache.Federated {
		fr := FederatedReport{TrustDomain: f.TrustDomain, Sequence: f.Sequence, CAs: []CAReport{}, JWTKeyIDs: f.JWTKeyIDs}
		for _, na := range f.CANotAfter {
			fr.CAs = append(fr.CAs, CAReport{NotAfter: na})
		}
		if fr.JWTKeyIDs == nil {
			fr.JWTKeyIDs = []string{}
		}
		r.Federated = append(r.Federated, fr)
	}
	r.Health, r.Reasons = health(st, now)
	return r
}

// health judges a status snapshot: the first reasons are the ones to act on.
func health(st snapshot, now time.Time) (string, []string) {
	var bad, warn []string
	if st.up.AttestRefused != "" {
		// First: the signer answers, and says no; only the policy (or
		// the TPM) can change that.
		bad = append(bad, fmt.Sprintf("attestation refused by the signer: %s (to admit this TPM, pin EK SHA-256 %s in a node block: `lanyard-agent tpm info --config FILE` prints the snippet)",
			st.up.AttestRefused, orDash(st.up.EKSHA256)))
	}
	if st.up.Revoked != "" {
		// First: nothing else can be fixed on this host until the signer
		// lifts it.
		bad = append(bad, "revoked by the signer: "+st.up.Revoked)
	}
	switch {
	case st.up.AgentID.IsZero():
		bad = append(bad, "not attested")
	case !now.Before(st.up.AgentNotAfter):
		bad = append(bad, "agent SVID expired")
	}
	if st.cache.EntriesWithoutID > 0 {
		bad = append(bad, pluralize(st.cache.EntriesWithoutID, "entry has", "entries have")+" no valid SVID")
	}
	if !st.tpm.Reachable {
		// First of the warnings: it is why attestations fail.
		warn = append(warn, fmt.Sprintf("TPM unreachable for %s (%s): %s", now.Sub(st.tpm.LostAt).Round(time.Second),
			pluralize(st.tpm.ReopenFailures, "reopen attempt", "reopen attempts")+" failed", st.tpm.Error))
	}
	if st.up.AttestFailures > 0 {
		warn = append(warn, pluralize(st.up.AttestFailures, "attestation", "attestations")+" failed in a row")
	}
	if !st.up.SyncConnected && st.up.AttestRefused == "" {
		// Not when attestation is refused: the signer is reachable, and
		// the stream is down because of the refusal named above.
		warn = append(warn, "signer unreachable (sync stream down)")
	}
	if st.renew.Failures > 0 {
		warn = append(warn, pluralize(st.renew.Failures, "renewal round", "renewal rounds")+" failed in a row")
	}
	// A caller at a cap, or an accept failing, means some callers are
	// being turned away right now or were within the last minute.
	warn = append(warn, exhaustionReasons(st.exhaustion, now)...)
	switch {
	case len(bad) > 0:
		return Unhealthy, append(bad, warn...)
	case len(warn) > 0:
		return Degraded, warn
	}
	return Healthy, nil
}

func pluralize(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return strconv.Itoa(n) + " " + many
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

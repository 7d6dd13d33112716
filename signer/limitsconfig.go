package signer

import (
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

// Limits bound what any network peer, and any one agent, can make the
// signer hold or do. Each default is far above what a busy fleet needs
// and far below what exhausts the signer; the reason is next to each.
type Limits struct {
	// AttestFirstMessageTimeout is how long an Attest stream may wait for
	// its evidence. An agent builds its evidence before it dials, so the
	// evidence follows the handshake within a round trip; a stream that
	// sends nothing is an attacker holding a slot.
	AttestFirstMessageTimeout time.Duration
	// MaxPendingAttestations caps Attest streams in flight (all of them are
	// unauthenticated), and MaxPendingAttestationsPerAddress those from one
	// source IP, so one peer cannot take every slot.
	MaxPendingAttestations           int
	MaxPendingAttestationsPerAddress int
	// MaxStreamsPerConnection is gRPC's MaxConcurrentStreams: an agent
	// uses one Sync stream and a few calls at a time on its connection.
	MaxStreamsPerConnection int
	// KeepaliveTime and KeepaliveTimeout: the signer pings a connection
	// quiet for KeepaliveTime and closes it when no answer comes within
	// KeepaliveTimeout, so a half-open agent connection (and its Sync
	// stream) is freed in under a minute.
	KeepaliveTime    time.Duration
	KeepaliveTimeout time.Duration
	// MaxConnectionIdle closes a connection that has had no stream for
	// that long; agents reconnect on their next call.
	MaxConnectionIdle time.Duration
	// MinPingInterval is the shortest interval between a client's pings;
	// faster pingers are disconnected (GOAWAY too_many_pings).
	MinPingInterval time.Duration
	// MaxSyncStreamsPerAgent caps concurrent Sync streams of one agent ID;
	// a new stream beyond it ends the agent's oldest.
	MaxSyncStreamsPerAgent int
	// JWTMintsPerSecond and JWTMintBurst are each agent's token bucket for
	// JWT-SVID mints: one token per JWT-SVID asked for.
	JWTMintsPerSecond int
	JWTMintBurst      int
	// RefusalLogInterval: warnings about refused calls are logged at most
	// once per source (peer address or agent) per interval, the next line
	// counting those left out.
	RefusalLogInterval time.Duration
}

// DefaultLimits are the limits when the file has no limits block or leaves
// a field out, as documented in the README.
func DefaultLimits() Limits {
	return Limits{
		// A real agent's evidence follows its TLS handshake at once; 5 s
		// covers a slow WAN link, while an idle stream is gone 6x sooner
		// than the 30 s attestation bound.
		AttestFirstMessageTimeout: 5 * time.Second,
		// An attestation holds its slot for one TPM round trip (well under
		// a second): 1,024 in flight is a thousand agents re-attesting at
		// the same instant, yet bounds the signer to a few MiB for them.
		MaxPendingAttestations: 1024,
		// One host attests one agent at a time; 64 leaves room for a NAT in
		// front of many hosts while keeping one peer to 1/16 of the slots.
		MaxPendingAttestationsPerAddress: 64,
		// An agent uses one Sync stream plus a few calls; 256 is the
		// common HTTP/2 default and keeps one connection to 256 handlers.
		MaxStreamsPerConnection: 256,
		KeepaliveTime:           30 * time.Second,
		KeepaliveTimeout:        10 * time.Second,
		// An agent's connection always has its Sync stream; an idle one is
		// an abandoned attestation connection or a peer holding a socket.
		MaxConnectionIdle: 5 * time.Minute,
		// gRPC clients cannot ping more often than every 10 s (grpc-go
		// raises any keepalive below that), so 5 s never punishes one.
		MinPingInterval: 5 * time.Second,
		// One stream in use plus one left half-open by a lost connection.
		MaxSyncStreamsPerAgent: 2,
		// An agent mints when a workload asks for a token it has not
		// cached: 100/s is 360,000 tokens an hour per host, the burst a
		// fleet-wide restart of every workload at once.
		JWTMintsPerSecond:  100,
		JWTMintBurst:       200,
		RefusalLogInterval: 10 * time.Second,
	}
}

// Floors and ceilings of the limits block.
const (
	minFirstMessageTimeout = 100 * time.Millisecond
	minLimitInterval       = time.Second
	maxLimitCount          = 1 << 20 // far beyond any sane value; bounds typos such as an extra 0
)

var signerLimitsSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "attest_first_message_timeout"},
		{Name: "max_pending_attestations"},
		{Name: "max_pending_attestations_per_address"},
		{Name: "max_streams_per_connection"},
		{Name: "keepalive_time"},
		{Name: "keepalive_timeout"},
		{Name: "max_connection_idle"},
		{Name: "min_ping_interval"},
		{Name: "max_sync_streams_per_agent"},
		{Name: "jwt_mints_per_second"},
		{Name: "jwt_mint_burst"},
		{Name: "refusal_log_interval"},
	},
}

// decodeLimits fills l from the file's limits blocks (at most one).
func decodeLimits(blocks hcl.Blocks, l *Limits) hcl.Diagnostics {
	content, diags := hclconf.OneBlock(blocks, signerLimitsSchema)
	if content == nil {
		return diags
	}
	f := hclconf.Fields{Content: content, Diags: diags}
	count := func(name string, v *int) { f.Int(name, v, 1, maxLimitCount) }
	f.Duration("attest_first_message_timeout", &l.AttestFirstMessageTimeout, minFirstMessageTimeout)
	count("max_pending_attestations", &l.MaxPendingAttestations)
	count("max_pending_attestations_per_address", &l.MaxPendingAttestationsPerAddress)
	count("max_streams_per_connection", &l.MaxStreamsPerConnection)
	f.Duration("keepalive_time", &l.KeepaliveTime, minLimitInterval)
	f.Duration("keepalive_timeout", &l.KeepaliveTimeout, minLimitInterval)
	f.Duration("max_connection_idle", &l.MaxConnectionIdle, minLimitInterval)
	f.Duration("min_ping_interval", &l.MinPingInterval, minLimitInterval)
	count("max_sync_streams_per_agent", &l.MaxSyncStreamsPerAgent)
	count("jwt_mints_per_second", &l.JWTMintsPerSecond)
	count("jwt_mint_burst", &l.JWTMintBurst)
	f.Duration("refusal_log_interval", &l.RefusalLogInterval, minLimitInterval)
	diags = f.Diags

	// Cross-field checks, each reported at the field the file set.
	if a, ok := content.Attributes["attest_first_message_timeout"]; ok && l.AttestFirstMessageTimeout > attestTimeout {
		diags = append(diags, hclconf.Errorf(a.Expr.Range(), "attest_first_message_timeout: %s is longer than the whole attestation's bound (%s)", l.AttestFirstMessageTimeout, attestTimeout))
	}
	// The per-address default follows a smaller total; a per-address cap
	// the file sets above the total is a mistake worth naming.
	if l.MaxPendingAttestationsPerAddress > l.MaxPendingAttestations {
		if a, ok := content.Attributes["max_pending_attestations_per_address"]; ok {
			diags = append(diags, hclconf.Errorf(a.Expr.Range(), "max_pending_attestations_per_address: %d is above max_pending_attestations (%d)", l.MaxPendingAttestationsPerAddress, l.MaxPendingAttestations))
		} else {
			l.MaxPendingAttestationsPerAddress = l.MaxPendingAttestations
		}
	}
	return diags
}

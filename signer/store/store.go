// Package store is the shared state of a tier of signer replicas, kept in
// etcd (go.etcd.io/etcd/client/v3): the policy and its revisions, every
// replica's public CAs and JWT keys, which replicas are alive, node
// revocations and the node registry. Nothing secret is ever written here.
//
// Keys under Config.Prefix (P):
//
//	P/policy            PolicyRecord (JSON); Revision counts up from 1
//	P/replicas/<name>   ReplicaRecord (JSON); no lease: a dead replica's
//	                    keys stay published until they expire
//	P/alive/<name>      AliveRecord (JSON), bound to the replica's lease
//	P/revoked/<ek>      Revocation (JSON)
//	P/nodes/<ek>        NodeRecord (JSON)
//
// One Store is one replica's view: Run loads everything under P, then
// follows etcd's watch from the revision it loaded, and hands every new
// State to its callback. Writes go straight to etcd; their effect reaches
// this replica, like every other, through the watch.
//
// At about 1,000 lines the package is past the ~800-line guide: the
// watch, the lease and the compare-and-swap writes share one client and
// one health record, and a split would have to export them.
package store

import (
	"crypto/tls"
	"errors"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Errors of the writes. Each is wrapped with the detail.
var (
	// ErrUnavailable: etcd did not answer within the operation's timeout
	// (no quorum, unreachable endpoints). Nothing was written.
	ErrUnavailable = errors.New("etcd unavailable")
	// ErrConflict: a compare-and-swap lost (another replica wrote first).
	ErrConflict = errors.New("etcd changed concurrently")
	// ErrExists: Revoke of a node already revoked.
	ErrExists = errors.New("already present")
	// ErrNotFound: Unrevoke of a node not revoked, Forget of an unknown replica.
	ErrNotFound = errors.New("not found")
	// ErrAlive: Forget of a replica that is alive, or Register of a name
	// another live process holds.
	ErrAlive = errors.New("replica is alive")
	// ErrInvalid: a name or EK hash that cannot be a key (empty, a '/',
	// not 64 hex digits), or a record over its size limit. Nothing was
	// written.
	ErrInvalid = errors.New("invalid record")
)

// Size limits of a record's JSON. A policy is refused by ApplyPolicy and
// SeedPolicy above MaxPolicySize (etcd's own request limit is 1.5 MiB); a
// record read back above its limit is skipped like one that does not
// decode, so a rogue writer of the prefix cannot make replicas hold
// arbitrary amounts of memory per key.
const (
	MaxPolicySize = 1 << 20
	MaxRecordSize = 256 << 10
)

// Config says where the shared state lives.
type Config struct {
	Endpoints []string    // etcd client URLs ("http://127.0.0.1:2379", "https://…")
	Prefix    string      // e.g. "/lanyard/example.org"; no trailing slash
	TLS       *tls.Config // nil: plain http
	// OpTimeout bounds every read and write (default 2s).
	OpTimeout time.Duration
	// LeaseTTL is how long a replica stays "alive" after its last
	// keepalive reached etcd (default 5s; etcd's floor applies).
	LeaseTTL time.Duration
	Log      hclog.Logger
}

// PolicyRecord is the policy in force for the whole tier.
type PolicyRecord struct {
	Revision int64  `json:"revision"` // 1, 2, 3 …: set by ApplyPolicy/SeedPolicy
	Filename string `json:"filename"` // the applied file's path, for file:line errors
	Source   string `json:"source"`   // the HCL text
	// Files are the ek_ca files the policy names, by the path policy.Parse
	// resolves them to, with their content (public certificates).
	Files     map[string][]byte `json:"files,omitempty"`
	AppliedAt time.Time         `json:"applied_at"`
	AppliedBy string            `json:"applied_by"` // replica name, and "uid N" of the admin caller
}

// PublicKey is one published CA certificate or JWT public key, and until
// when relying parties must keep it.
type PublicKey struct {
	// Exactly one of CertDER (an X.509 CA certificate) and JWTKeyPKIX (a
	// PKIX public key, with KID) is set.
	CertDER    []byte    `json:"cert_der,omitempty"`
	JWTKeyPKIX []byte    `json:"jwt_key_pkix,omitempty"`
	KID        string    `json:"kid,omitempty"`
	KeepUntil  time.Time `json:"keep_until"`
	// Phase is "active", "next" or "earlier", for replica list.
	Phase string `json:"phase"`
}

// ReplicaRecord is what one replica publishes: its address and the
// public halves of every key it holds or held that may still vouch for
// something.
type ReplicaRecord struct {
	Name      string      `json:"name"`
	Address   string      `json:"address"` // agent API host:port
	Keys      []PublicKey `json:"keys"`
	Updated   time.Time   `json:"updated"`
	Forgotten bool        `json:"forgotten,omitempty"` // set by Forget: will not come back
	// ModRevision is the etcd revision that last wrote this record, set
	// when it is read (not stored): DeleteReplica's compare-and-swap.
	ModRevision int64 `json:"-"`
}

// AliveRecord is present while the replica's lease lives.
type AliveRecord struct {
	Name    string    `json:"name"`
	Address string    `json:"address"`
	Since   time.Time `json:"since"`
	Version string    `json:"version"`
}

// Revocation of one node (agent), shared by every replica.
type Revocation struct {
	Reason    string    `json:"reason"`
	At        time.Time `json:"at"`
	ByUID     uint32    `json:"by_uid"`
	ByReplica string    `json:"by_replica"`
}

// TokenRevocation refuses JWT-SVIDs on every agent of every replica: one
// token by JTI, or every token of SPIFFEID issued before IssuedBefore.
type TokenRevocation struct {
	JTI          string    `json:"jti,omitempty"`
	SPIFFEID     string    `json:"spiffe_id,omitempty"`
	IssuedBefore time.Time `json:"issued_before,omitzero"`
	Reason       string    `json:"reason"`
	At           time.Time `json:"at"`
	ByUID        uint32    `json:"by_uid"`
	ByReplica    string    `json:"by_replica"`
	ExpiresAt    time.Time `json:"expires_at"`
}

// NodeRecord is one agent in the shared registry.
type NodeRecord struct {
	EKSHA256        string    `json:"ek_sha256"`
	AgentID         string    `json:"agent_id"`
	Nodes           []string  `json:"nodes"`
	TPMManufacturer string    `json:"tpm_manufacturer,omitempty"`
	FirstAttested   time.Time `json:"first_attested"`
	LastAttested    time.Time `json:"last_attested"`
	AgentVersion    string    `json:"agent_version,omitempty"`
	// Replica is the replica the agent last opened a Sync stream with;
	// it is connected there only while that replica is alive.
	Replica string `json:"replica,omitempty"`
}

// State is everything under the prefix at Revision. A State handed out is
// never modified afterwards (copy on write): keep it, share it.
type State struct {
	Revision int64 // etcd revision this state is at
	Policy   *PolicyRecord
	Replicas map[string]ReplicaRecord
	Alive    map[string]AliveRecord
	Revoked  map[string]Revocation // by EK SHA-256
	Nodes    map[string]NodeRecord // by EK SHA-256
	// TokenRevoked are the token revocations in force, by
	// TokenRevocationName; etcd drops each at its ExpiresAt (a lease).
	TokenRevoked map[string]TokenRevocation
	// Full is true for a State loaded whole (the first one, and after a
	// compaction); otherwise NodesChanged names the EK hashes whose node
	// or revocation record the batch of events behind it wrote or
	// deleted, so a tier of many agents can apply a change in time
	// proportional to the change, not to the registry.
	Full         bool
	NodesChanged []string
}

// Health is the store's link to etcd now.
type Health struct {
	OK        bool
	Since     time.Time // when OK last changed
	LastError string    // "" when OK
	Revision  int64     // last revision seen (watch or read)
}

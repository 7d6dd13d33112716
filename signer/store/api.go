package store

import "context"

// Open connects to etcd (lazily: an unreachable etcd is not an error here;
// Health and the operations report it).
func Open(cfg Config) (*Store, error) { panic("store: not implemented") }

// Store is one replica's link to the shared state. Safe for concurrent use.
type Store struct{}

// Close ends the client (and the lease: the replica stops being alive at once).
func (s *Store) Close() error { panic("store: not implemented") }

// Run loads every key under the prefix, calls onChange with that State,
// then follows the watch from the next revision and calls onChange with a
// new State after every batch of events, until ctx ends. It survives etcd
// outages: the watch resumes from the last revision seen when etcd is
// back, and a compacted revision makes it load everything again. Run
// returns only when ctx ends (nil) or on a malformed prefix. Records that
// do not decode are skipped with a warning (never fatal).
func (s *Store) Run(ctx context.Context, onChange func(State)) error {
	panic("store: not implemented")
}

// Health reports the link to etcd: not OK while reads, the watch or the
// lease keepalive fail, with the error and since when.
func (s *Store) Health() Health { panic("store: not implemented") }

// Register makes name alive: grants a lease of LeaseTTL, puts
// P/alive/<name> on it (refused with ErrAlive when a key for name exists
// on another lease), and keeps it alive until ctx ends or Close; after an
// etcd outage that let the lease expire it grants a new one and puts the
// key again. It returns once the first put succeeded (or the error).
func (s *Store) Register(ctx context.Context, rec AliveRecord) error {
	panic("store: not implemented")
}

// PublishReplica puts P/replicas/<rec.Name> (overwriting; Forgotten is
// cleared by a replica publishing itself).
func (s *Store) PublishReplica(ctx context.Context, rec ReplicaRecord) error {
	panic("store: not implemented")
}

// Forget marks a replica that is not alive as Forgotten (ErrAlive when it
// is alive, ErrNotFound when there is no such record).
func (s *Store) Forget(ctx context.Context, name string) error { panic("store: not implemented") }

// DeleteReplica removes P/replicas/<name> if its mod revision is still
// modRev (garbage collection of a forgotten replica whose keys expired);
// ErrConflict otherwise.
func (s *Store) DeleteReplica(ctx context.Context, name string, modRev int64) error {
	panic("store: not implemented")
}

// SeedPolicy writes rec as revision 1 only when P/policy does not exist;
// it reports whether it wrote.
func (s *Store) SeedPolicy(ctx context.Context, rec PolicyRecord) (bool, error) {
	panic("store: not implemented")
}

// ApplyPolicy writes rec as the next revision (the current one + 1, or 1),
// by compare-and-swap on P/policy's mod revision, retried on conflict a
// few times, and returns the revision written.
func (s *Store) ApplyPolicy(ctx context.Context, rec PolicyRecord) (int64, error) {
	panic("store: not implemented")
}

// Revoke creates P/revoked/<ek> (ErrExists when present).
func (s *Store) Revoke(ctx context.Context, ek string, r Revocation) error {
	panic("store: not implemented")
}

// Unrevoke deletes P/revoked/<ek> (ErrNotFound when absent) and returns
// what it deleted.
func (s *Store) Unrevoke(ctx context.Context, ek string) (Revocation, error) {
	panic("store: not implemented")
}

// PutNode writes P/nodes/<rec.EKSHA256>.
func (s *Store) PutNode(ctx context.Context, rec NodeRecord) error { panic("store: not implemented") }

// Writes counts the puts and deletes this Store made (benchmarks: etcd
// writes per second at steady state), lease grants included, keepalives not.
func (s *Store) Writes() uint64 { panic("store: not implemented") }

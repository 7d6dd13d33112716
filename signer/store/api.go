package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Defaults of Config.
const (
	DefaultOpTimeout = 2 * time.Second
	DefaultLeaseTTL  = 5 * time.Second
)

// casAttempts bounds the retries of a compare-and-swap that lost to
// another replica: two admins applying at once settle in two rounds, and a
// writer that keeps losing is told so (ErrConflict) instead of spinning.
const casAttempts = 5

// Open connects to etcd (lazily: an unreachable etcd is not an error here;
// Health and the operations report it).
func Open(cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, fmt.Errorf("open etcd store: no endpoints")
	}
	if err := checkPrefix(cfg.Prefix); err != nil {
		return nil, fmt.Errorf("open etcd store: %w", err)
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = DefaultOpTimeout
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: cfg.Endpoints,
		TLS:       cfg.TLS,
		// Pings find a dead member's connection within ~2s, so the client
		// moves to another endpoint even when no request is in flight.
		DialKeepAliveTime:    time.Second,
		DialKeepAliveTimeout: time.Second,
		PermitWithoutStream:  true,
		// The store reports what matters through Health and its own log;
		// the client's zap output would be a second, unstructured log.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("open etcd store: %w", err)
	}
	stop, cancel := context.WithCancel(context.Background())
	s := &Store{
		cfg: cfg, log: cfg.Log, cli: cli, root: cfg.Prefix + "/",
		stop: stop, cancel: cancel,
		warned: map[string]time.Time{},
	}
	s.health = Health{Since: time.Now(), LastError: errNoAnswer.Error()}
	s.linkErr = errNoAnswer
	return s, nil
}

// checkPrefix refuses a prefix that would make keys ambiguous or share a
// range with another tree ("/lanyard/a" must not also read "/lanyard/ab").
func checkPrefix(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("prefix: empty: %w", ErrInvalid)
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("prefix %q: must start with '/': %w", p, ErrInvalid)
	case strings.HasSuffix(p, "/"):
		return fmt.Errorf("prefix %q: must not end with '/': %w", p, ErrInvalid)
	}
	return nil
}

// Store is one replica's link to the shared state. Safe for concurrent use.
type Store struct {
	cfg    Config
	log    hclog.Logger
	cli    *clientv3.Client
	root   string // Prefix + "/"
	writes atomic.Uint64

	// stop ends the registrations' keepalive loops (Close).
	stop   context.Context
	cancel context.CancelFunc
	regs   sync.WaitGroup

	mu       sync.Mutex // guards what follows
	health   Health
	linkErr  error // last read, write, probe or keepalive outcome
	watchErr error // non-nil while Run runs without a working watch
	warned   map[string]time.Time
	closed   bool
}

// Close ends the client (and the lease: the replica stops being alive at once).
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.regs.Wait() // each revokes its lease on the way out
	if err := s.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("close etcd client: %w", err)
	}
	return nil
}

// PublishReplica puts P/replicas/<rec.Name> (overwriting; Forgotten is
// cleared by a replica publishing itself).
func (s *Store) PublishReplica(ctx context.Context, rec ReplicaRecord) error {
	if err := checkName(rec.Name); err != nil {
		return fmt.Errorf("publish replica: %w", err)
	}
	rec.Forgotten = false
	if rec.Updated.IsZero() {
		rec.Updated = time.Now()
	}
	val, err := encode(rec, MaxRecordSize)
	if err != nil {
		return fmt.Errorf("publish replica %s: %w", rec.Name, err)
	}
	err = s.do(ctx, "publish replica "+rec.Name, func(ctx context.Context) error {
		_, err := s.cli.Put(ctx, s.key(kindReplicas, rec.Name), val)
		return err
	})
	if err == nil {
		s.writes.Add(1)
	}
	return err
}

// Forget marks a replica that is not alive as Forgotten (ErrAlive when it
// is alive, ErrNotFound when there is no such record).
func (s *Store) Forget(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return fmt.Errorf("forget replica: %w", err)
	}
	step := "forget replica " + name
	repKey, aliveKey := s.key(kindReplicas, name), s.key(kindAlive, name)
	for range casAttempts {
		var resp *clientv3.TxnResponse
		err := s.do(ctx, step, func(ctx context.Context) (err error) {
			resp, err = s.cli.Txn(ctx).Then(clientv3.OpGet(repKey), clientv3.OpGet(aliveKey)).Commit()
			return err
		})
		if err != nil {
			return err
		}
		reps, alive := resp.Responses[0].GetResponseRange().Kvs, resp.Responses[1].GetResponseRange().Kvs
		if len(alive) > 0 {
			return fmt.Errorf("%s: %w", step, ErrAlive)
		}
		if len(reps) == 0 {
			return fmt.Errorf("%s: %w", step, ErrNotFound)
		}
		var rec ReplicaRecord
		if err := decode(reps[0].Value, MaxRecordSize, &rec); err != nil {
			return fmt.Errorf("%s: stored record: %w", step, err)
		}
		rec.Forgotten, rec.Updated = true, time.Now()
		val, err := encode(rec, MaxRecordSize)
		if err != nil {
			return fmt.Errorf("%s: %w", step, err)
		}
		// The replica must neither have come back to life nor republished
		// since we looked.
		var ok bool
		err = s.do(ctx, step, func(ctx context.Context) error {
			r, err := s.cli.Txn(ctx).If(
				clientv3.Compare(clientv3.ModRevision(repKey), "=", reps[0].ModRevision),
				clientv3.Compare(clientv3.CreateRevision(aliveKey), "=", 0),
			).Then(clientv3.OpPut(repKey, val)).Commit()
			if err == nil {
				ok = r.Succeeded
			}
			return err
		})
		if err != nil {
			return err
		}
		if ok {
			s.writes.Add(1)
			return nil
		}
	}
	return fmt.Errorf("%s: %w", step, ErrConflict)
}

// DeleteReplica removes P/replicas/<name> if its mod revision is still
// modRev (garbage collection of a forgotten replica whose keys expired);
// ErrConflict otherwise.
func (s *Store) DeleteReplica(ctx context.Context, name string, modRev int64) error {
	if err := checkName(name); err != nil {
		return fmt.Errorf("delete replica: %w", err)
	}
	key, step := s.key(kindReplicas, name), "delete replica "+name
	var ok bool
	err := s.do(ctx, step, func(ctx context.Context) error {
		r, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", modRev)).
			Then(clientv3.OpDelete(key)).Commit()
		if err == nil {
			ok = r.Succeeded
		}
		return err
	})
	switch {
	case err != nil:
		return err
	case !ok:
		return fmt.Errorf("%s: changed since revision %d: %w", step, modRev, ErrConflict)
	}
	s.writes.Add(1)
	return nil
}

// SeedPolicy writes rec as revision 1 only when P/policy does not exist;
// it reports whether it wrote.
func (s *Store) SeedPolicy(ctx context.Context, rec PolicyRecord) (bool, error) {
	rec.Revision = 1
	if rec.AppliedAt.IsZero() {
		rec.AppliedAt = time.Now()
	}
	val, err := encode(rec, MaxPolicySize)
	if err != nil {
		return false, fmt.Errorf("seed policy: %w", err)
	}
	key := s.key(kindPolicy, "")
	var ok bool
	err = s.do(ctx, "seed policy", func(ctx context.Context) error {
		r, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, val)).Commit()
		if err == nil {
			ok = r.Succeeded
		}
		return err
	})
	if err != nil {
		return false, err
	}
	if ok {
		s.writes.Add(1)
	}
	return ok, nil
}

// ApplyPolicy writes rec as the next revision (the current one + 1, or 1),
// by compare-and-swap on P/policy's mod revision, retried on conflict a
// few times, and returns the revision written.
func (s *Store) ApplyPolicy(ctx context.Context, rec PolicyRecord) (int64, error) {
	if rec.AppliedAt.IsZero() {
		rec.AppliedAt = time.Now()
	}
	// Refuse an oversized policy before touching etcd, with the limit in
	// the message: etcd's own refusal would only say "request too large".
	if _, err := encode(rec, MaxPolicySize); err != nil {
		return 0, fmt.Errorf("apply policy: %w", err)
	}
	key := s.key(kindPolicy, "")
	for range casAttempts {
		var cur *clientv3.GetResponse
		err := s.do(ctx, "apply policy: read the revision in force", func(ctx context.Context) (err error) {
			cur, err = s.cli.Get(ctx, key)
			return err
		})
		if err != nil {
			return 0, err
		}
		var modRev, next int64 = 0, 1
		if len(cur.Kvs) > 0 {
			kv := cur.Kvs[0]
			modRev = kv.ModRevision
			var old struct {
				Revision int64 `json:"revision"`
			}
			// A record that no longer decodes must not block the apply
			// that repairs it: each write bumps the key's version by one,
			// as it bumps Revision, so the version is a safe floor.
			if json.Unmarshal(kv.Value, &old) != nil || old.Revision < kv.Version {
				old.Revision = kv.Version
			}
			next = old.Revision + 1
		}
		rec.Revision = next
		val, err := encode(rec, MaxPolicySize)
		if err != nil {
			return 0, fmt.Errorf("apply policy: %w", err)
		}
		var ok bool
		err = s.do(ctx, "apply policy", func(ctx context.Context) error {
			r, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", modRev)).
				Then(clientv3.OpPut(key, val)).Commit()
			if err == nil {
				ok = r.Succeeded
			}
			return err
		})
		if err != nil {
			return 0, err
		}
		if ok {
			s.writes.Add(1)
			return next, nil
		}
	}
	return 0, fmt.Errorf("apply policy: %d attempts: %w", casAttempts, ErrConflict)
}

// Revoke creates P/revoked/<ek> (ErrExists when present).
func (s *Store) Revoke(ctx context.Context, ek string, r Revocation) error {
	if err := checkEK(ek); err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	if r.At.IsZero() {
		r.At = time.Now()
	}
	val, err := encode(r, MaxRecordSize)
	if err != nil {
		return fmt.Errorf("revoke %s: %w", ek, err)
	}
	key, step := s.key(kindRevoked, ek), "revoke "+ek
	var ok bool
	err = s.do(ctx, step, func(ctx context.Context) error {
		resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, val)).Commit()
		if err == nil {
			ok = resp.Succeeded
		}
		return err
	})
	switch {
	case err != nil:
		return err
	case !ok:
		return fmt.Errorf("%s: %w", step, ErrExists)
	}
	s.writes.Add(1)
	return nil
}

// Unrevoke deletes P/revoked/<ek> (ErrNotFound when absent) and returns
// what it deleted.
func (s *Store) Unrevoke(ctx context.Context, ek string) (Revocation, error) {
	if err := checkEK(ek); err != nil {
		return Revocation{}, fmt.Errorf("unrevoke: %w", err)
	}
	step := "unrevoke " + ek
	var resp *clientv3.DeleteResponse
	err := s.do(ctx, step, func(ctx context.Context) (err error) {
		resp, err = s.cli.Delete(ctx, s.key(kindRevoked, ek), clientv3.WithPrevKV())
		return err
	})
	switch {
	case err != nil:
		return Revocation{}, err
	case resp.Deleted == 0:
		return Revocation{}, fmt.Errorf("%s: %w", step, ErrNotFound)
	}
	s.writes.Add(1)
	var r Revocation
	if len(resp.PrevKvs) > 0 {
		// Deleted either way; a record that did not decode reports as empty.
		_ = decode(resp.PrevKvs[0].Value, MaxRecordSize, &r)
	}
	return r, nil
}

// RevokeToken writes P/tokenrevoked/<TokenRevocationName> on a lease that
// ends at rec.ExpiresAt, when every token it covers has expired: etcd
// then deletes it, and every replica's watch drops it. A revocation of a
// jti is created only once (ErrExists); one of a SPIFFE ID replaces the
// earlier one (its later cut-off covers more).
func (s *Store) RevokeToken(ctx context.Context, rec TokenRevocation) error {
	name := TokenRevocationName(rec.JTI, rec.SPIFFEID)
	if err := checkTokenName(name); err != nil || (rec.JTI == "") == (rec.SPIFFEID == "") {
		return fmt.Errorf("revoke token: exactly one of jti and SPIFFE ID: %w", ErrInvalid)
	}
	val, err := encode(rec, MaxRecordSize)
	if err != nil {
		return fmt.Errorf("revoke token %s: %w", name, err)
	}
	ttl := int64(time.Until(rec.ExpiresAt)/time.Second) + 1
	if ttl < 1 {
		return fmt.Errorf("revoke token %s: already expired: %w", name, ErrInvalid)
	}
	key, step := s.key(kindTokens, name), "revoke token "+name
	var ok bool
	err = s.do(ctx, step, func(ctx context.Context) error {
		lease, err := s.cli.Grant(ctx, ttl)
		if err != nil {
			return err
		}
		put := clientv3.OpPut(key, val, clientv3.WithLease(lease.ID))
		if rec.SPIFFEID != "" {
			_, err = s.cli.Put(ctx, key, val, clientv3.WithLease(lease.ID))
			ok = err == nil
			return err
		}
		resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).Then(put).Commit()
		if err == nil {
			ok = resp.Succeeded
			if !ok {
				s.cli.Revoke(ctx, lease.ID)
			}
		}
		return err
	})
	switch {
	case err != nil:
		return err
	case !ok:
		return fmt.Errorf("%s: %w", step, ErrExists)
	}
	s.writes.Add(2) // the lease and the record
	return nil
}

// PutNode writes P/nodes/<rec.EKSHA256>.
func (s *Store) PutNode(ctx context.Context, rec NodeRecord) error {
	if err := checkEK(rec.EKSHA256); err != nil {
		return fmt.Errorf("put node: %w", err)
	}
	val, err := encode(rec, MaxRecordSize)
	if err != nil {
		return fmt.Errorf("put node %s: %w", rec.EKSHA256, err)
	}
	err = s.do(ctx, "put node "+rec.EKSHA256, func(ctx context.Context) error {
		_, err := s.cli.Put(ctx, s.key(kindNodes, rec.EKSHA256), val)
		return err
	})
	if err == nil {
		s.writes.Add(1)
	}
	return err
}

// Writes counts the puts and deletes this Store made (benchmarks: etcd
// writes per second at steady state), lease grants included, keepalives not.
func (s *Store) Writes() uint64 { return s.writes.Load() }

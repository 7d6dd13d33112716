package store

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// probeEvery is how often Run asks etcd for a quorum read while it runs:
// with no traffic at all, a lost quorum still shows in Health within
// about two periods.
const probeEvery = time.Second

// errCompacted: the watch's next revision was compacted away; only a full
// load can resume.
var errCompacted = errors.New("watch revision compacted")

// Run loads every key under the prefix, calls onChange with that State,
// then follows the watch from the next revision and calls onChange with a
// new State after every batch of events, until ctx ends. It survives etcd
// outages: the watch resumes from the last revision seen when etcd is
// back, and a compacted revision makes it load everything again. Run
// returns only when ctx ends (nil) or on a malformed prefix. Records that
// do not decode are skipped with a warning (never fatal).
func (s *Store) Run(ctx context.Context, onChange func(State)) error {
	if err := checkPrefix(s.cfg.Prefix); err != nil {
		return fmt.Errorf("run etcd store: %w", err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { s.probe(ctx) })
	defer wg.Wait()
	defer s.setWatch(errStopped)

	s.setWatch(errLoading)
	var (
		cur *State // nil: load everything
		bo  backoff
	)
	for ctx.Err() == nil {
		if cur == nil {
			st, err := s.load(ctx)
			if err != nil {
				s.setWatch(err)
				bo.wait(ctx)
				continue
			}
			cur = &st
			onChange(st)
		}
		st, err := s.follow(ctx, *cur, onChange, &bo)
		cur = &st
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, errCompacted):
			s.log.Warn("watch revision compacted, loading the shared state again", "revision", st.Revision)
			cur = nil
		default:
			s.setWatch(err)
			s.log.Warn("etcd watch failed, resuming", "revision", st.Revision, "error", err)
			bo.wait(ctx)
		}
	}
	return nil
}

// load reads everything under the prefix at one revision.
func (s *Store) load(ctx context.Context) (State, error) {
	var resp *clientv3.GetResponse
	err := s.do(ctx, "load shared state", func(ctx context.Context) (err error) {
		resp, err = s.cli.Get(ctx, s.root, clientv3.WithPrefix())
		return err
	})
	if err != nil {
		return State{}, err
	}
	b := builder{s: s, st: State{
		Revision: resp.Header.Revision,
		Full:     true,
		Replicas: map[string]ReplicaRecord{},
		Alive:    map[string]AliveRecord{},
		Revoked:  map[string]Revocation{},
		Nodes:    map[string]NodeRecord{},

		TokenRevoked: map[string]TokenRevocation{},
	}, own: allOwned}
	for _, kv := range resp.Kvs {
		b.put(kv)
	}
	b.st.NodesChanged = nil // Full: everything
	s.seen(resp.Header.Revision)
	return b.st, nil
}

// follow watches from st.Revision+1 and hands out a new State per batch of
// events. It returns the last State handed out, and why the watch ended.
func (s *Store) follow(ctx context.Context, st State, onChange func(State), bo *backoff) (State, error) {
	// Without a leader the member we talk to may be cut off from the
	// others: require one, so the watch fails instead of going quiet.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := s.cli.Watch(wctx, s.root, clientv3.WithPrefix(), clientv3.WithRev(st.Revision+1), clientv3.WithCreatedNotify())
	for resp := range wch {
		if resp.CompactRevision != 0 {
			return st, errCompacted
		}
		if err := resp.Err(); err != nil {
			return st, fmt.Errorf("watch from revision %d: %w", st.Revision+1, err)
		}
		s.setWatch(nil)
		s.setLink(nil)
		bo.reset()
		if resp.Header.Revision > 0 {
			s.seen(resp.Header.Revision)
		}
		if len(resp.Events) == 0 { // created or progress notification
			continue
		}
		b := builder{s: s, st: st}
		b.st.Revision = resp.Events[len(resp.Events)-1].Kv.ModRevision
		b.st.Full, b.st.NodesChanged = false, nil
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				b.del(ev.Kv)
			} else {
				b.put(ev.Kv)
			}
		}
		st = b.st
		onChange(st)
	}
	if ctx.Err() != nil {
		return st, ctx.Err()
	}
	return st, fmt.Errorf("watch from revision %d: channel closed", st.Revision+1)
}

// probe asks for a quorum read of the policy key every probeEvery, so
// Health follows etcd's availability even when nothing changes.
func (s *Store) probe(ctx context.Context) {
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, probeEvery)
		_, err := s.cli.Get(pctx, s.key(kindPolicy, ""), clientv3.WithCountOnly())
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.setLink(err)
	}
}

// Which of a State's maps a builder may write to: those of a State
// already handed out are shared and copied on first write.
const (
	ownReplicas = 1 << iota
	ownAlive
	ownRevoked
	ownNodes
	ownTokens
	allOwned = ownReplicas | ownAlive | ownRevoked | ownNodes | ownTokens
)

// builder makes the next State from the previous one, copying each map
// the first time it changes it, so a State handed out never changes.
type builder struct {
	s   *Store
	st  State
	own int
}

func (b *builder) put(kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	kind, name, ok := b.s.split(key)
	if !ok {
		b.s.warnRecord(key, errors.New("not a key of the store's layout"))
		return
	}
	var err error
	switch kind {
	case kindPolicy:
		var rec PolicyRecord
		if err = decode(kv.Value, MaxPolicySize, &rec); err == nil {
			b.st.Policy = &rec
		}
	case kindReplicas:
		var rec ReplicaRecord
		if err = decode(kv.Value, MaxRecordSize, &rec); err == nil {
			rec.Name, rec.ModRevision = name, kv.ModRevision
			writable(&b.st.Replicas, &b.own, ownReplicas)[name] = rec
		}
	case kindAlive:
		var rec AliveRecord
		if err = decode(kv.Value, MaxRecordSize, &rec); err == nil {
			rec.Name = name
			writable(&b.st.Alive, &b.own, ownAlive)[name] = rec
		}
	case kindRevoked:
		var rec Revocation
		b.st.NodesChanged = append(b.st.NodesChanged, name)
		if err = decode(kv.Value, MaxRecordSize, &rec); err == nil {
			writable(&b.st.Revoked, &b.own, ownRevoked)[name] = rec
		}
	case kindTokens:
		var rec TokenRevocation
		if err = decode(kv.Value, MaxRecordSize, &rec); err == nil {
			writable(&b.st.TokenRevoked, &b.own, ownTokens)[name] = rec
		}
	case kindNodes:
		var rec NodeRecord
		b.st.NodesChanged = append(b.st.NodesChanged, name)
		if err = decode(kv.Value, MaxRecordSize, &rec); err == nil {
			rec.EKSHA256 = name
			writable(&b.st.Nodes, &b.own, ownNodes)[name] = rec
		}
	}
	if err != nil {
		b.s.warnRecord(key, err)
		// The previous record was replaced in etcd: keeping it would show
		// one that no longer exists. The policy is the exception: the last
		// good one stays in force, as with a policy file that breaks.
		if kind != kindPolicy {
			b.del(kv)
		}
	}
}

func (b *builder) del(kv *mvccpb.KeyValue) {
	kind, name, ok := b.s.split(string(kv.Key))
	if !ok {
		return
	}
	switch kind {
	case kindPolicy:
		b.st.Policy = nil
	case kindReplicas:
		if _, ok := b.st.Replicas[name]; ok {
			delete(writable(&b.st.Replicas, &b.own, ownReplicas), name)
		}
	case kindAlive:
		if _, ok := b.st.Alive[name]; ok {
			delete(writable(&b.st.Alive, &b.own, ownAlive), name)
		}
	case kindRevoked:
		b.st.NodesChanged = append(b.st.NodesChanged, name)
		if _, ok := b.st.Revoked[name]; ok {
			delete(writable(&b.st.Revoked, &b.own, ownRevoked), name)
		}
	case kindTokens:
		if _, ok := b.st.TokenRevoked[name]; ok {
			delete(writable(&b.st.TokenRevoked, &b.own, ownTokens), name)
		}
	case kindNodes:
		b.st.NodesChanged = append(b.st.NodesChanged, name)
		if _, ok := b.st.Nodes[name]; ok {
			delete(writable(&b.st.Nodes, &b.own, ownNodes), name)
		}
	}
}

// writable returns *m, first replaced by a private copy unless bit is
// already set in own.
func writable[V any](m *map[string]V, own *int, bit int) map[string]V {
	if *own&bit == 0 {
		c := maps.Clone(*m)
		if c == nil {
			c = map[string]V{}
		}
		*m, *own = c, *own|bit
	}
	return *m
}

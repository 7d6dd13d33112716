package store

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// errClosed: Register on a closed Store.
var errClosed = errors.New("store closed")

// Register makes name alive: grants a lease of LeaseTTL, puts
// P/alive/<name> on it (refused with ErrAlive when a key for name exists
// on another lease), and keeps it alive until ctx ends or Close; after an
// etcd outage that let the lease expire it grants a new one and puts the
// key again. It returns once the first put succeeded (or the error).
func (s *Store) Register(ctx context.Context, rec AliveRecord) error {
	if err := checkName(rec.Name); err != nil {
		return fmt.Errorf("register: %w", err)
	}
	if rec.Since.IsZero() {
		rec.Since = time.Now()
	}
	val, err := encode(rec, MaxRecordSize)
	if err != nil {
		return fmt.Errorf("register %s: %w", rec.Name, err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("register %s: %w", rec.Name, errClosed)
	}
	s.regs.Add(1) // under mu: Close waits for every registration it let in
	s.mu.Unlock()

	// The keepalive lives until the caller's ctx ends, Close, or the
	// client is closed under it.
	rctx, cancel := context.WithCancel(ctx)
	stopClose := context.AfterFunc(s.stop, cancel)
	stopClient := context.AfterFunc(s.cli.Ctx(), cancel)
	done := func() {
		stopClose()
		stopClient()
		cancel()
		s.regs.Done()
	}
	var id clientv3.LeaseID
	for range casAttempts {
		if id, err = s.claim(rctx, rec.Name, val, 0); !errors.Is(err, ErrConflict) {
			break
		}
	}
	if err != nil {
		done()
		return err
	}
	go func() {
		defer done()
		s.keepAlive(rctx, rec.Name, val, id)
	}()
	return nil
}

// claim grants a lease and puts the alive key on it, if the key is absent
// or still on prev (our own lease, about to be replaced). It returns the
// new lease, or ErrAlive when another lease holds the name.
func (s *Store) claim(ctx context.Context, name, val string, prev clientv3.LeaseID) (clientv3.LeaseID, error) {
	step := "register " + name
	ttl := int64(math.Ceil(s.cfg.LeaseTTL.Seconds()))
	var lease *clientv3.LeaseGrantResponse
	err := s.do(ctx, step+": grant lease", func(ctx context.Context) (err error) {
		lease, err = s.cli.Grant(ctx, ttl)
		return err
	})
	if err != nil {
		return 0, err
	}
	s.writes.Add(1)
	key := s.key(kindAlive, name)
	var resp *clientv3.TxnResponse
	err = s.do(ctx, step, func(ctx context.Context) (err error) {
		resp, err = s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, val, clientv3.WithLease(lease.ID))).
			Else(clientv3.OpGet(key)).Commit()
		return err
	})
	if err == nil && !resp.Succeeded && prev != 0 {
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) > 0 && clientv3.LeaseID(kvs[0].Lease) == prev {
			err = s.do(ctx, step, func(ctx context.Context) (err error) {
				resp, err = s.cli.Txn(ctx).If(clientv3.Compare(clientv3.LeaseValue(key), "=", prev)).
					Then(clientv3.OpPut(key, val, clientv3.WithLease(lease.ID))).
					Else(clientv3.OpGet(key)).Commit()
				return err
			})
			if err == nil && resp.Succeeded {
				s.revokeLease(prev)
			}
		}
	}
	switch {
	case err != nil:
		s.revokeLease(lease.ID)
		return 0, err
	case resp.Succeeded:
		s.writes.Add(1)
		return lease.ID, nil
	}
	s.revokeLease(lease.ID)
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 { // deleted between the compare and now
		return 0, fmt.Errorf("%s: %w", step, ErrConflict)
	}
	var holder AliveRecord
	_ = decode(kvs[0].Value, MaxRecordSize, &holder) // for the message only
	return 0, fmt.Errorf("%s: held since %s by %q: %w", step, holder.Since.Format(time.RFC3339), holder.Address, ErrAlive)
}

// keepAlive keeps lease id alive until ctx ends, and re-claims the name
// whenever the lease is lost (an outage longer than LeaseTTL), with
// backoff, as long as ctx lives. It revokes the lease on the way out so
// the replica leaves Alive at once on a clean stop.
func (s *Store) keepAlive(ctx context.Context, name, val string, id clientv3.LeaseID) {
	var bo backoff
	for {
		ch, err := s.cli.KeepAlive(ctx, id)
		if err == nil {
			for range ch {
				s.setLink(nil)
				bo.reset()
			}
		}
		if ctx.Err() != nil {
			s.revokeLease(id)
			return
		}
		s.setLink(fmt.Errorf("lease of replica %s lost", name))
		s.log.Warn("replica lease lost, registering again", "replica", name, "lease", int64(id))
		for {
			if !bo.wait(ctx) {
				s.revokeLease(id)
				return
			}
			next, err := s.claim(ctx, name, val, id)
			if err == nil {
				id = next
				s.log.Info("replica registered again", "replica", name, "lease", int64(id))
				break
			}
			if errors.Is(err, ErrAlive) {
				s.log.Warn("replica name held by another process", "replica", name, "error", err)
			}
		}
	}
}

// revokeLease ends a lease, best effort: one that cannot be revoked now
// expires by itself within LeaseTTL.
func (s *Store) revokeLease(id clientv3.LeaseID) {
	if s.cli.Ctx().Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.OpTimeout)
	defer cancel()
	if _, err := s.cli.Revoke(ctx, id); err == nil {
		s.writes.Add(1)
	}
}

package signer

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/lanyard-dev/lanyard/signer/store"
)

// tier is the signer's part in a tier of replicas (the etcd block); nil
// for a lone signer. The replicas share, through etcd, the policy, node
// revocations and registry, and the public half of every replica's CAs and
// JWT keys: the bundle each replica serves is the union of them all.
//
// Lock order: tier.mu is a leaf: it may be taken under Signer.mu, never
// the other way round.
type tier struct {
	st   *store.Store
	name string

	mu        sync.Mutex
	state     store.State // last seen; zero until the first load
	loaded    chan struct{}
	policyRev int64     // revision in force (0: none from etcd yet)
	tried     int64     // last revision parsed, good or bad
	policyErr string    // why revision `tried` was refused; "" when in force
	joinUntil time.Time // a joining replica serves agents from then; zero otherwise
	certs     map[string]*x509.Certificate
	jwtKeys   map[string]*ecdsa.PublicKey

	changed chan struct{} // a new state arrived (buffered 1)
	dirty   chan struct{} // this replica's record must be published (buffered 1)
	// nodeQueue holds the registry records to write, by EK hash,
	// coalesced: the last one wins.
	nodeQueue map[string]store.NodeRecord
	nodeDirty chan struct{}
}

// peerKeyRefreshMax bounds the wait between looks at the peers' keys'
// keep-until times, which pass without any etcd event.
const peerKeyRefreshMax = time.Minute

// nodeRefreshInterval is how stale a node's last_attested may get in etcd
// before an attestation writes it again: renewals re-attest every
// agent_ttl/2, and writing each would make etcd's load follow time, not
// change.
const nodeRefreshInterval = time.Hour

func newTier(cfg *Config) (*tier, error) {
	tlsConf, err := cfg.Etcd.etcdTLS()
	if err != nil {
		return nil, err
	}
	st, err := store.Open(store.Config{Endpoints: cfg.Etcd.Endpoints, Prefix: cfg.Etcd.Prefix, TLS: tlsConf, OpTimeout: etcdOpTimeout})
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	return &tier{
		st: st, name: cfg.ReplicaName, loaded: make(chan struct{}),
		certs: make(map[string]*x509.Certificate), jwtKeys: make(map[string]*ecdsa.PublicKey),
		changed: make(chan struct{}, 1), dirty: make(chan struct{}, 1),
		nodeQueue: make(map[string]store.NodeRecord), nodeDirty: make(chan struct{}, 1),
	}, nil
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (t *tier) snapshot() store.State {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.state
}

// joinTier runs before the signer serves agents: it follows etcd, seeds
// the policy when etcd holds none, makes this replica alive, publishes its
// keys and, when it brings a CA no agent has heard of into a tier whose
// agents trust other CAs, waits ca_publish_lead so that every replica has
// pushed that CA to its agents before it signs anything. run follows etcd
// until ctx ends; joinTier returns once the replica may serve.
func (s *Signer) joinTier(ctx context.Context, run func(func() error)) error {
	t := s.tier
	run(func() error {
		return t.st.Run(ctx, func(st store.State) {
			t.mu.Lock()
			t.state = st
			select {
			case <-t.loaded:
			default:
				close(t.loaded)
			}
			t.mu.Unlock()
			poke(t.changed)
			s.applyShared(st)
		})
	})
	s.log.Info("waiting for etcd", "endpoints", s.cfg.Etcd.Endpoints, "prefix", s.cfg.Etcd.Prefix)
	select {
	case <-t.loaded:
	case <-ctx.Done():
		return ctx.Err()
	}
	if t.snapshot().Policy == nil {
		if err := s.seedPolicy(ctx); err != nil {
			return err
		}
	}
	err := t.st.Register(ctx, store.AliveRecord{Name: t.name, Address: s.cfg.ListenAddress, Since: time.Now().UTC(), Version: cli.Version()})
	if errors.Is(err, store.ErrAlive) {
		return fmt.Errorf("replica_name %q: another live replica uses it: give each replica its own name", t.name)
	}
	if err != nil {
		return fmt.Errorf("register replica %q in etcd: %w", t.name, err)
	}
	st := t.snapshot()
	s.mu.Lock()
	active := s.auth.active.Cert
	s.mu.Unlock()
	joining := !holdsCert(st, active.Raw) && holdsLiveCA(st, time.Now())
	if err := s.publishReplica(ctx); err != nil {
		return err
	}
	if !joining {
		return nil
	}
	until := time.Now().Add(s.cfg.CAPublishLead)
	t.mu.Lock()
	t.joinUntil = until
	t.mu.Unlock()
	s.log.Info("replica joining the tier: its CA is published, it serves agents once every replica has pushed it",
		"serial", serialHex(active), "serves_from", until.UTC().Format(time.RFC3339))
	select {
	case <-time.After(time.Until(until)):
	case <-ctx.Done():
		return ctx.Err()
	}
	t.mu.Lock()
	t.joinUntil = time.Time{}
	t.mu.Unlock()
	return nil
}

// holdsCert reports whether any replica's record publishes the CA der.
func holdsCert(st store.State, der []byte) bool {
	for _, r := range st.Replicas {
		for _, k := range r.Keys {
			if k.CertDER != nil && string(k.CertDER) == string(der) {
				return true
			}
		}
	}
	return false
}

// holdsLiveCA reports whether any replica's record publishes a CA that
// relying parties must still keep at now: then agents exist that trust
// only what the tier published, and a new CA must wait its lead.
func holdsLiveCA(st store.State, now time.Time) bool {
	for _, r := range st.Replicas {
		for _, k := range r.Keys {
			if k.CertDER != nil && !rotator.Droppable(now, k.KeepUntil) {
				return true
			}
		}
	}
	return false
}

// seedPolicy writes policy_path's content to etcd as revision 1 when etcd
// holds no policy (the first replica of a tier), then waits until the
// watch brings a policy back, whoever wrote it.
func (s *Signer) seedPolicy(ctx context.Context) error {
	t := s.tier
	if s.cfg.PolicyPath == "" {
		s.log.Warn("etcd holds no policy yet and policy_path is not set: no agent is served until `lanyard-signer policy apply`")
		return nil
	}
	s.mu.Lock()
	src, pol := s.policySrc, s.pol
	s.mu.Unlock()
	files, err := policyFiles(pol)
	if err != nil {
		return fmt.Errorf("seed the policy into etcd: %w", err)
	}
	rec := store.PolicyRecord{Filename: s.cfg.PolicyPath, Source: string(src), Files: files, AppliedAt: time.Now().UTC(), AppliedBy: t.name + " (seeded from policy_path)"}
	for {
		wrote, err := t.st.SeedPolicy(ctx, rec)
		if err == nil {
			if wrote {
				s.log.Info("policy seeded into etcd from policy_path", "path", s.cfg.PolicyPath)
			}
			break
		}
		s.log.Warn("policy not seeded yet", "error", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	for t.snapshot().Policy == nil {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// tierLoop keeps this replica's record, the registry writes and the
// peers' expiring keys current until ctx ends.
func (s *Signer) tierLoop(ctx context.Context) error {
	t := s.tier
	var retry <-chan time.Time
	backoff := 250 * time.Millisecond
	for {
		next := s.refreshPeers(time.Now())
		wait := time.NewTimer(min(time.Until(next), peerKeyRefreshMax))
		select {
		case <-ctx.Done():
			wait.Stop()
			return nil
		case <-t.changed:
		case <-wait.C:
		case <-t.dirty:
			if err := s.publishReplica(ctx); err != nil {
				s.log.Warn("replica record not published; retrying", "error", err)
				retry = time.After(backoff)
				backoff = min(2*backoff, 5*time.Second)
			} else {
				backoff = 250 * time.Millisecond
			}
		case <-t.nodeDirty:
			if err := s.writeNodes(ctx); err != nil {
				s.log.Warn("node registry not written to etcd; retrying", "error", err)
				retry = time.After(backoff)
				backoff = min(2*backoff, 5*time.Second)
			}
		case <-retry:
			retry = nil
			poke(t.dirty)
			poke(t.nodeDirty)
		}
		wait.Stop()
		s.collectForgotten(ctx)
	}
}

// publishReplica writes this replica's record: its address and the public
// half of every CA and JWT key it publishes, each with how long relying
// parties must keep it. The active and prepared ones are kept until their
// own end: what they sign is not written per signature, and a replica
// that dies leaves them published for as long as anything they signed may
// live.
func (s *Signer) publishReplica(ctx context.Context) error {
	s.mu.Lock()
	a := s.auth
	rec := store.ReplicaRecord{Name: s.tier.name, Address: s.cfg.ListenAddress, Updated: time.Now().UTC()}
	rec.Keys = append(rec.Keys, store.PublicKey{CertDER: a.active.Cert.Raw, KeepUntil: a.active.Cert.NotAfter, Phase: "active"})
	rec.Keys = append(rec.Keys, store.PublicKey{JWTKeyPKIX: a.activeJWT.pubDER, KID: a.activeJWT.kid, KeepUntil: a.activeJWT.notAfter, Phase: "active"})
	if a.next != nil {
		rec.Keys = append(rec.Keys, store.PublicKey{CertDER: a.next.Cert.Raw, KeepUntil: a.next.Cert.NotAfter, Phase: "next"})
		rec.Keys = append(rec.Keys, store.PublicKey{JWTKeyPKIX: a.nextJWT.pubDER, KID: a.nextJWT.kid, KeepUntil: a.nextJWT.notAfter, Phase: "next"})
	}
	for _, e := range a.earlier {
		rec.Keys = append(rec.Keys, store.PublicKey{CertDER: e.cert.Raw, KeepUntil: e.keepUntil, Phase: "earlier"})
	}
	for _, k := range a.earlierJWT {
		rec.Keys = append(rec.Keys, store.PublicKey{JWTKeyPKIX: k.pubDER, KID: k.kid, KeepUntil: k.keepUntil, Phase: "earlier"})
	}
	s.mu.Unlock()
	if err := s.tier.st.PublishReplica(ctx, rec); err != nil {
		return fmt.Errorf("publish replica %q: %w", s.tier.name, err)
	}
	return nil
}

// refreshPeers takes the other replicas' unexpired CAs and JWT keys from
// the last state into the bundle (a change is written to bundle_path and
// pushed), and returns when one of them expires next.
func (s *Signer) refreshPeers(now time.Time) time.Time {
	t := s.tier
	st := t.snapshot()
	next := now.Add(peerKeyRefreshMax)
	var cas []*x509.Certificate
	var keys []publicJWTKey
	t.mu.Lock()
	seenCert, seenJWT := make(map[string]bool), make(map[string]bool)
	names := make([]string, 0, len(st.Replicas))
	for name := range st.Replicas {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if name == t.name {
			continue
		}
		for _, k := range st.Replicas[name].Keys {
			if rotator.Droppable(now, k.KeepUntil) {
				continue
			}
			if at := rotator.DropAt(k.KeepUntil); at.Before(next) {
				next = at
			}
			switch {
			case k.CertDER != nil && !seenCert[string(k.CertDER)]:
				c, ok := t.certs[string(k.CertDER)]
				if !ok {
					var err error
					if c, err = x509.ParseCertificate(k.CertDER); err != nil || !c.IsCA {
						s.warnLimited("peer CA ignored: not a CA certificate", name, "replica", name)
						continue
					}
					t.certs[string(k.CertDER)] = c
				}
				seenCert[string(k.CertDER)] = true
				cas = append(cas, c)
			case k.JWTKeyPKIX != nil && k.KID != "" && !seenJWT[k.KID]:
				pub, ok := t.jwtKeys[string(k.JWTKeyPKIX)]
				if !ok {
					p, err := x509.ParsePKIXPublicKey(k.JWTKeyPKIX)
					ec, isEC := p.(*ecdsa.PublicKey)
					if err != nil || !isEC {
						s.warnLimited("peer JWT key ignored: not an ECDSA public key", name, "replica", name, "kid", k.KID)
						continue
					}
					pub = ec
					t.jwtKeys[string(k.JWTKeyPKIX)] = pub
				}
				seenJWT[k.KID] = true
				keys = append(keys, publicJWTKey{kid: k.KID, pubDER: k.JWTKeyPKIX, pub: pub, keepUntil: k.KeepUntil, bound: k.KeepUntil})
			}
		}
	}
	t.mu.Unlock()
	s.setPeers(cas, keys)
	return next
}

// collectForgotten deletes the records of forgotten replicas whose keys
// have all expired. Only the first live replica by name does it, so the
// tier makes one delete, not one per replica.
func (s *Signer) collectForgotten(ctx context.Context) {
	st := s.tier.snapshot()
	var first string
	for name := range st.Alive {
		if first == "" || name < first {
			first = name
		}
	}
	if first != s.tier.name {
		return
	}
	now := time.Now()
	for name, r := range st.Replicas {
		if !r.Forgotten || st.Alive[name].Name != "" {
			continue
		}
		if slices.ContainsFunc(r.Keys, func(k store.PublicKey) bool { return !rotator.Droppable(now, k.KeepUntil) }) {
			continue
		}
		if err := s.tier.st.DeleteReplica(ctx, name, r.ModRevision); err == nil {
			s.log.Info("forgotten replica removed: its keys have all expired", "replica", name)
		}
	}
}

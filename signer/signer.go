// Package signer is Lanyard's upstream signer. It holds the CA and JWT
// signing keys in memory and rotates them with overlap (authority.go),
// attests agents by their TPMs, streams each agent the workload entries its
// node may serve together with the trust bundle (X.509 CAs and JWT keys),
// and signs the agents' CSRs and JWT-SVIDs for those entries only.
//
// Size: past the ~800-line guide, as it is one daemon's domain (CA
// schedule, JWT keys, agent API, limits, policy reload) whose parts share
// the Signer's lock and state; signer/policy is the part that stands alone.
package signer

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/grpcstop"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// signerSVIDTTL is the lifetime of the signer's own TLS identity (at most
// ca_ttl/2, like every SVID); it is reissued from memory at half-life or
// when another CA takes over signing, so it never needs to be stored.
const signerSVIDTTL = 24 * time.Hour

// maxCAWait bounds how long the CA rotation sleeps between looks at the
// clock: a timer counts monotonic time, which stands still while a host is
// suspended, and the CA's decisions are in wall-clock time.
const maxCAWait = time.Minute

// Signer is one running signer. Create it with New and run it with Run.
type Signer struct {
	cfg *Config
	log hclog.Logger
	id  spiffeid.ID // the signer's own SPIFFE ID

	metrics *Metrics // safe for concurrent use

	// The limits' state; each is safe for concurrent use.
	gate    *attestGate
	syncs   *syncSlots
	mints   *mintLimiter
	warnLog *logLimiter

	keys *keyStore // nil with memory keys

	mu      sync.Mutex
	auth    *authority
	bundle  *x509bundle.Bundle // the CAs the TLS layer verifies agents by; safe for concurrent use
	bundleN uint64             // bumped on every bundle change, once it is on disk
	// agentBundle is the bundle agents are sent: the one last written to
	// bundle_path, so no agent ever trusts a CA the file does not hold.
	// Never modified, only replaced.
	agentBundle *signerpb.Bundle
	// peerCAs and peerJWT are the other replicas' published keys (tier
	// only): the bundle is their union with this replica's.
	peerCAs  []*x509.Certificate
	peerJWT  []publicJWTKey
	bundleMu sync.Mutex // orders bundle_path writes with the pushes that follow them
	tier     *tier      // nil for a lone signer
	pol      *policy.Policy
	rules    []node.Rule
	agents   map[spiffeid.ID]*agentRecord
	changed  chan struct{} // closed and replaced on every change of policy or bundle
	tlsCert  *tls.Certificate
	tlsCA    *CA // the CA that signed tlsCert
	tlsKey   *ecdsa.PrivateKey

	// nodes is the node registry by EK hash (nodes.go), saved to
	// state_dir by saveNodes; nodesDirty asks saveNodesLoop for a write.
	nodes       map[string]*NodeInfo
	nodesSaveMu sync.Mutex
	nodesDirty  chan struct{}
	addr        string // the agent API's listening address, once Serve runs
	started     time.Time

	// feds are the federation blocks' fetchers, fixed at New;
	// fedBundles (under mu) the bundles agents are sent of each federated
	// trust domain held, and fedWarnings the policy's federates_with
	// names without a federation block.
	feds        []*fedPeer
	fedBundles  map[spiffeid.TrustDomain]*signerpb.Bundle
	fedWarnings []string
	// fedFloor is the shortest refresh interval obeyed (minRefreshHint;
	// tests lower it, with bundleHint, the hint served, to see a rotation
	// cross in well under a second).
	fedFloor   time.Duration
	bundleHint time.Duration

	// tokenRevs are the token revocations in force (tokens.go), sorted,
	// never modified, only replaced (under mu); tokenRevMsgs the same as
	// agents receive them. tokenRevsMu orders their changes with the
	// writes that keep them.
	tokenRevs    []TokenRevocation
	tokenRevMsgs []*signerpb.TokenRevocation
	tokenRevsMu  sync.Mutex

	policySrc []byte        // the policy file's content in force
	ready     chan struct{} // closed once Serve accepts agents
	stopping  chan struct{} // closed when Serve begins to shut down: Sync streams end at once
	reloads   reloadCounters
}

// agentRecord is what the signer remembers of an attested agent. It lives in
// memory only: after a signer restart, agents attest again.
type agentRecord struct {
	node     *node.Node
	names    []string // policy node blocks the TPM matches, under the current policy
	notAfter time.Time
}

// New loads the policy named by cfg and restores the CAs and JWT keys kept
// in cfg.StateDir (an unusable state file is ErrBadCAState or
// ErrBadJWTState). With key_storage "tpm" it opens the TPM once, unseals
// the key-encryption key and signs on with the stored keys (unusable key
// storage is ErrKeyStorage); otherwise it creates a fresh in-memory CA and
// JWT key and publishes them with the earlier ones.
func New(cfg *Config, log hclog.Logger) (*Signer, error) {
	return newSigner(cfg, log, func() (*node.TPM, error) { return node.OpenTPM(cfg.TPM) })
}

// newSigner is New with the TPM's opener (tests pass a simulator).
func newSigner(cfg *Config, log hclog.Logger, openTPM func() (*node.TPM, error)) (*Signer, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	// The bytes are kept so the policy watcher knows what is in force.
	// In a tier, policy_path is optional: it only seeds an empty etcd, and
	// etcd's revision replaces it as soon as it is read.
	var src []byte
	pol := &policy.Policy{}
	if cfg.Etcd == nil || cfg.PolicyPath != "" {
		var err error
		if src, err = os.ReadFile(cfg.PolicyPath); err != nil {
			return nil, fmt.Errorf("load policy: %w", err)
		}
		if pol, err = policy.Parse(src, cfg.PolicyPath, cfg.TrustDomain); err != nil {
			return nil, fmt.Errorf("load policy: %w", err)
		}
	}
	restored, err := loadCAState(cfg.StateDir, cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("restore earlier CAs: %w", err)
	}
	restoredJWT, err := loadJWTState(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("restore earlier JWT keys: %w", err)
	}
	// A tier's registry is etcd's: the local file is a lone signer's.
	nodes := make(map[string]*NodeInfo)
	if cfg.Etcd == nil {
		if nodes, err = loadNodes(cfg.StateDir); err != nil {
			return nil, fmt.Errorf("restore node registry: %w", err)
		}
	}
	// A tier's are etcd's, too.
	var tokenRevs []TokenRevocation
	if cfg.Etcd == nil {
		if tokenRevs, err = loadTokenRevocations(cfg.StateDir, time.Now()); err != nil {
			return nil, fmt.Errorf("restore token revocations: %w", err)
		}
	}
	st := restoredState{cas: restored, jwt: restoredJWT}
	var keys *keyStore
	if cfg.KeyStorage == KeyStorageTPM {
		start := time.Now()
		tpm, err := openTPM()
		if err != nil {
			return nil, fmt.Errorf("open the signer's TPM: %w", err)
		}
		// The TPM is needed only here: the key-encryption key stays in
		// memory, and every signature is made in memory.
		keys, err = openKeyStore(cfg.StateDir, tpm)
		tpm.Close()
		if err != nil {
			return nil, err
		}
		if st.keys, err = keys.load(); err != nil {
			return nil, err
		}
		log.Info("signing keys unsealed with the TPM", "generations", len(st.keys), "took_ms", time.Since(start).Milliseconds())
	} else if st.signed, err = loadSignedState(cfg.StateDir); err != nil {
		return nil, fmt.Errorf("restore earlier CAs: %w", err)
	}
	auth, err := newAuthority(cfg.TrustDomain, cfg.CATTL, cfg.CAPublishLead, st, time.Now(), log)
	if err != nil {
		return nil, err
	}
	if cfg.OIDC != nil {
		auth.issuer = cfg.OIDC.Issuer
	}
	if keys == nil {
		auth.markSigned = func(ids []string) error { return saveSignedState(cfg.StateDir, ids) }
	}
	id, err := spiffeid.FromSegments(cfg.TrustDomain, "lanyard", "signer")
	if err != nil {
		return nil, fmt.Errorf("signer ID: %w", err)
	}
	s := &Signer{
		cfg:        cfg,
		log:        log,
		id:         id,
		auth:       auth,
		keys:       keys,
		bundle:     x509bundle.FromX509Authorities(cfg.TrustDomain, auth.published()),
		bundleN:    1,
		agents:     make(map[spiffeid.ID]*agentRecord),
		nodes:      nodes,
		nodesDirty: make(chan struct{}, 1),
		started:    time.Now(),
		changed:    make(chan struct{}),

		tokenRevs:    tokenRevs,
		tokenRevMsgs: tokenRevocationMessages(tokenRevs),

		policySrc: src,
		ready:     make(chan struct{}),
		stopping:  make(chan struct{}),

		gate:    newAttestGate(cfg.Limits),
		syncs:   newSyncSlots(cfg.Limits),
		mints:   newMintLimiter(cfg.Limits),
		warnLog: newLogLimiter(cfg.Limits.RefusalLogInterval),

		fedBundles: make(map[spiffeid.TrustDomain]*signerpb.Bundle),
		fedFloor:   minRefreshHint,
	}
	if cfg.BundleEndpoint != nil {
		s.bundleHint = cfg.BundleEndpoint.refreshHint(cfg.CAPublishLead)
	}
	for _, fc := range cfg.Federations {
		if err := s.addFederation(fc); err != nil {
			return nil, err
		}
	}
	if cfg.Etcd != nil {
		if s.tier, err = newTier(cfg); err != nil {
			return nil, err
		}
	}
	s.agentBundle = s.bundleMessage(auth.published(), auth.publishedJWT())
	s.setPolicyLocked(pol)
	s.metrics = newMetrics(s)
	return s, nil
}

// Metrics returns the signer's metrics, served on metrics_address when it
// is set. The policy watcher counts its reloads here.
func (s *Signer) Metrics() *Metrics { return s.metrics }

// Run writes the trust bundle and the CA state, serves the agent API on the
// configured address and rotates the CA until ctx ends, and returns once
// everything it started has ended. A replica of a tier opens its port only
// once it may serve: while a joining replica waits its publish lead, its
// port refuses, and agents choose another replica.
func (s *Signer) Run(ctx context.Context) error {
	listen := func() (net.Listener, error) {
		lis, err := net.Listen("tcp", s.cfg.ListenAddress)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", s.cfg.ListenAddress, err)
		}
		return lis, nil
	}
	if s.tier == nil {
		lis, err := listen()
		if err != nil {
			return err
		}
		return s.Serve(ctx, lis)
	}
	return s.serve(ctx, listen)
}

// Serve is Run on a listener the caller opened (tests use port 0).
func (s *Signer) Serve(ctx context.Context, lis net.Listener) error {
	return s.serve(ctx, func() (net.Listener, error) { return lis, nil })
}

func (s *Signer) serve(ctx context.Context, listen func() (net.Listener, error)) error {
	// Opened first, so that a metrics port in use stops the start.
	metricsLn, err := s.listenMetrics()
	if err != nil {
		return err
	}
	adminLn, err := s.listenAdmin()
	if err != nil {
		if metricsLn != nil {
			metricsLn.Close()
		}
		return err
	}
	oidcLn, err := s.listenOIDC()
	if err != nil {
		for _, ln := range []net.Listener{metricsLn, adminLn} {
			if ln != nil {
				ln.Close()
			}
		}
		return err
	}
	bundleLn, err := s.listenBundleEndpoint()
	if err != nil {
		for _, ln := range []net.Listener{metricsLn, adminLn, oidcLn} {
			if ln != nil {
				ln.Close()
			}
		}
		return err
	}
	closeAll := func() {
		for _, ln := range []net.Listener{metricsLn, adminLn, oidcLn, bundleLn} {
			if ln != nil {
				ln.Close()
			}
		}
	}
	// The fresh CA and JWT key are on disk before they sign anything, so
	// a restart keeps publishing them while their SVIDs live.
	s.mu.Lock()
	pub := s.auth.publication()
	s.mu.Unlock()
	if err := s.publish(pub); err != nil {
		closeAll()
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	if metricsLn != nil {
		g.Go(func() error { return s.serveMetrics(ctx, metricsLn) })
	}
	if adminLn != nil {
		g.Go(func() error { return s.serveAdmin(ctx, adminLn) })
	}
	var lis net.Listener
	if s.tier != nil {
		err = s.joinTier(ctx, g.Go)
		if err == nil {
			g.Go(func() error { return s.tierLoop(ctx) })
		}
	}
	if err == nil {
		lis, err = listen()
	}
	if err != nil {
		for _, ln := range []net.Listener{oidcLn, bundleLn} {
			if ln != nil {
				ln.Close()
			}
		}
		cancel()
		g.Wait()
		if s.tier != nil {
			s.tier.st.Close()
		}
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	}
	tlsConf := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.serverCertificate(time.Now()) },
		// Attest runs before the agent has an identity, so a client
		// certificate is optional at the handshake; Sync and
		// SignX509SVIDs refuse calls without one.
		ClientAuth: tls.RequestClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return nil
			}
			_, _, err := x509svid.ParseAndVerify(raw, s.bundle)
			return err
		},
	}
	srv := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(tlsConf))}, serverLimits(s.cfg.Limits)...)...)
	signerpb.RegisterSignerServer(srv, &api{s: s})
	s.mu.Lock()
	s.addr = lis.Addr().String()
	s.mu.Unlock()
	s.log.Info("signer listening", "address", lis.Addr().String(), "trust_domain", s.cfg.TrustDomain.String(), "bundle_path", s.cfg.BundlePath)

	g.Go(func() error { return srv.Serve(lis) })
	if oidcLn != nil {
		// Served from here, not earlier: a joining replica's JWKS then
		// already holds the tier's keys, the union agents validate with.
		g.Go(func() error { return s.serveOIDC(ctx, oidcLn) })
	}
	if bundleLn != nil {
		// Like OIDC's: a joining replica serves the tier's union.
		g.Go(func() error { return s.serveBundleEndpoint(ctx, bundleLn) })
	}
	for _, p := range s.feds {
		g.Go(func() error { return s.runFederation(ctx, p) })
	}
	close(s.ready) // the listener queues connections until Serve takes them
	g.Go(func() error { return s.rotateCAs(ctx) })
	if s.tier == nil {
		g.Go(func() error { return s.watchPolicy(ctx) })
	}
	g.Go(func() error {
		<-ctx.Done()
		start := time.Now()
		s.log.Info("signer stopping", "address", lis.Addr().String())
		// Sync streams never end by themselves: end them now (agents
		// reconnect, to this signer's successor or a replica), so that
		// only calls in flight, bounded by stopGrace, delay the exit.
		close(s.stopping)
		grpcstop.Stop(srv, stopGrace)
		if s.tier != nil {
			// The lease goes with the client: the other replicas see
			// this one gone at once, not a lease TTL later.
			s.tier.st.Close()
		}
		s.log.Info("signer stopped", "took_ms", time.Since(start).Milliseconds())
		return nil
	})
	g.Go(func() error { return s.saveNodesLoop(ctx) })
	g.Go(func() error { return s.expireTokenRevocationsLoop(ctx) })
	err = g.Wait()
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

// stopGrace bounds how long a stopping signer lets calls in flight (an
// attestation's challenge round trip, a signing batch) finish.
const stopGrace = 5 * time.Second

// serverLimits are the gRPC server's share of the limits: streams per
// connection, and keepalive both ways. The signer pings quiet connections
// so a half-open agent connection (and its Sync stream) is noticed; it
// lets clients ping too, as often as gRPC clients can (the agent sets no
// keepalive today, and one it adds must never be punished), but no more.
func serverLimits(l Limits) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxConcurrentStreams(uint32(l.MaxStreamsPerConnection)),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:              l.KeepaliveTime,
			Timeout:           l.KeepaliveTimeout,
			MaxConnectionIdle: l.MaxConnectionIdle,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             l.MinPingInterval,
			PermitWithoutStream: true,
		}),
	}
}

// SetPolicy replaces the policy in force and pushes the change to every
// connected agent. The caller has validated p.
func (s *Signer) SetPolicy(p *policy.Policy) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.setPolicyLocked(p)
	s.notifyLocked()
}

func (s *Signer) setPolicyLocked(p *policy.Policy) {
	s.pol = p
	s.rules = make([]node.Rule, 0, len(p.Nodes))
	for _, n := range p.Nodes {
		s.rules = append(s.rules, node.Rule{Name: n.Name, EKSHA256: n.EKSHA256, Roots: n.Roots, Intermediates: n.Intermediates})
	}
	// A policy edit can add or remove a TPM from a node block: re-match
	// every known agent now rather than at its next attestation.
	now := time.Now()
	for id, rec := range s.agents {
		rec.names = rec.node.Rematch(s.rules, now)
		if len(rec.names) == 0 {
			delete(s.agents, id)
		}
	}
	s.fedWarnings = s.federationWarningsLocked()
}

// notifyLocked wakes every Sync stream.
func (s *Signer) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// serverCertificate returns the signer's TLS identity, reissuing it from
// the in-memory CA once it is past half its lifetime or once another CA
// signs: agents then see the current CA, and the old one can leave the
// bundle once this certificate expires.
func (s *Signer) serverCertificate(now time.Time) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.tlsCert; c != nil && s.tlsCA == s.auth.current(now) {
		leaf := c.Leaf
		if now.Before(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)) {
			return c, nil
		}
	}
	if s.tlsKey == nil {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate signer key: %w", err)
		}
		s.tlsKey = key
	}
	cert, err := s.auth.sign(s.tlsKey.Public(), s.id, min(signerSVIDTTL, s.cfg.CATTL/2), nil, now)
	if err != nil {
		return nil, err
	}
	s.tlsCert = &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: s.tlsKey, Leaf: cert}
	s.tlsCA = s.auth.current(now)
	return s.tlsCert, nil
}

// rotateCAs carries out the CA's rotation decisions as they fall due,
// until ctx ends. A failure to save the bundle or the CA state ends the
// signer: a CA that is not on disk must not come to sign.
func (s *Signer) rotateCAs(ctx context.Context) error {
	for {
		next, err := s.advanceCAs(time.Now())
		if err != nil {
			return fmt.Errorf("rotate CA: %w", err)
		}
		t := time.NewTimer(min(time.Until(next), maxCAWait))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// advanceCAs runs the authority's decisions due at now and, when the
// bundle changed, saves it, then pushes it to every Sync stream. It
// returns when to look again. Only Serve (before it starts the rotation)
// and the rotation itself write the files, one after the other, so
// writing outside the lock cannot reorder them.
func (s *Signer) advanceCAs(now time.Time) (time.Time, error) {
	s.bundleMu.Lock()
	defer s.bundleMu.Unlock()
	s.mu.Lock()
	changed, next, tickErr := s.auth.tick(now)
	var pub publication
	if changed {
		pub = s.auth.publication()
		// The TLS verifier follows at once: a new CA signs nothing before
		// its publish lead, and a dropped one must stop being accepted.
		s.bundle.SetX509Authorities(s.unionCAsLocked(pub.cas))
	}
	s.mu.Unlock()
	if !changed {
		return next, tickErr
	}
	// On disk before any agent hears of it: bundle_path is what relying
	// parties and restarted agents trust, so an agent must never hold a
	// bundle the file lacks. When the write fails nothing is pushed, and
	// the error ends the signer.
	if err := s.publish(pub); err != nil {
		return next, err
	}
	if s.tier != nil {
		poke(s.tier.dirty) // the other replicas' agents learn of it through etcd
	}
	s.pushBundle(pub.cas, pub.keys)
	return next, tickErr
}

// pushBundle makes the union of own (cas, keys) and the peers' the bundle
// agents are sent, and wakes every Sync stream. bundle_path already holds
// it. The caller holds bundleMu.
func (s *Signer) pushBundle(cas []*x509.Certificate, keys []publicJWTKey) {
	s.mu.Lock()
	cas, keys = s.unionCAsLocked(cas), s.unionKeysLocked(keys)
	s.bundle.SetX509Authorities(cas)
	s.bundleN++
	s.agentBundle = s.bundleMessage(cas, keys)
	s.notifyLocked()
	seq := s.bundleN
	s.mu.Unlock()
	s.log.Info("trust bundle changed", "sequence", seq, "cas", len(cas), "jwt_keys", len(keys))
}

// unionCAsLocked is own followed by the other replicas' CAs (none for a
// lone signer): the tier's bundle.
func (s *Signer) unionCAsLocked(own []*x509.Certificate) []*x509.Certificate {
	if len(s.peerCAs) == 0 {
		return own
	}
	out := slices.Clip(own)
	for _, c := range s.peerCAs {
		if !slices.ContainsFunc(own, c.Equal) {
			out = append(out, c)
		}
	}
	// One order for the whole tier, newest first: every replica then
	// sends the same bundle, and an agent that moves to another replica
	// sees no change to push to its workloads.
	slices.SortStableFunc(out, func(a, b *x509.Certificate) int {
		if c := b.NotBefore.Compare(a.NotBefore); c != 0 {
			return c
		}
		return bytes.Compare(a.Raw, b.Raw)
	})
	return out
}

// unionKeysLocked is unionCAsLocked for JWT keys.
func (s *Signer) unionKeysLocked(own []publicJWTKey) []publicJWTKey {
	if len(s.peerJWT) == 0 {
		return own
	}
	out := slices.Clip(own)
	for _, k := range s.peerJWT {
		if !slices.ContainsFunc(own, func(o publicJWTKey) bool { return o.kid == k.kid }) {
			out = append(out, k)
		}
	}
	slices.SortStableFunc(out, func(a, b publicJWTKey) int { return strings.Compare(a.kid, b.kid) })
	return out
}

// setPeers replaces the other replicas' CAs and JWT keys; when that
// changes the bundle, the union is written to bundle_path, then pushed.
func (s *Signer) setPeers(cas []*x509.Certificate, keys []publicJWTKey) {
	s.bundleMu.Lock()
	defer s.bundleMu.Unlock()
	s.mu.Lock()
	same := slices.EqualFunc(s.peerCAs, cas, func(a, b *x509.Certificate) bool { return a.Equal(b) }) &&
		slices.EqualFunc(s.peerJWT, keys, func(a, b publicJWTKey) bool { return a.kid == b.kid && a.bound.Equal(b.bound) })
	if same {
		s.mu.Unlock()
		return
	}
	s.peerCAs, s.peerJWT = cas, keys
	own, ownKeys := s.auth.published(), s.auth.publishedJWT()
	union := s.unionCAsLocked(own)
	s.mu.Unlock()
	if err := writeBundle(s.cfg.BundlePath, union); err != nil {
		// Not pushed: no agent may trust what the file lacks. The next
		// change (or the peers' next record) tries again.
		s.log.Error("trust bundle not written; the other replicas' keys are not pushed yet", "path", s.cfg.BundlePath, "error", err)
		s.mu.Lock()
		s.peerCAs, s.peerJWT = nil, nil
		s.mu.Unlock()
		return
	}
	s.pushBundle(own, ownKeys)
}

// publish saves the encrypted signing keys (key_storage "tpm") or the
// record of which keys signed (memory), then the CA and JWT key state,
// then bundle_path: the state is what keeps the bundle continuous across
// a restart. Keys go first: a key whose certificate never reached the
// state was never published, and a restart drops it safely, while a
// published certificate without its key would make a restart refuse to
// sign with it.
func (s *Signer) publish(p publication) error {
	if s.keys != nil {
		if err := s.keys.save(p.active, p.activeJWT, p.next, p.nextJWT); err != nil {
			return err
		}
	} else if err := saveSignedState(s.cfg.StateDir, p.signed); err != nil {
		return err
	}
	if err := saveCAState(s.cfg.StateDir, p.cas); err != nil {
		return err
	}
	if err := saveJWTState(s.cfg.StateDir, p.keys); err != nil {
		return err
	}
	s.mu.Lock()
	cas := s.unionCAsLocked(p.cas)
	s.mu.Unlock()
	return writeBundle(s.cfg.BundlePath, cas)
}

// BundleSequence reports how many times the bundle has changed (tests and
// status use it).
func (s *Signer) BundleSequence() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundleN
}

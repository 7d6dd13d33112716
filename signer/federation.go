package signer

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bounds of the federation fetcher. The refresh interval is the fetched
// bundle's spiffe_refresh_hint within [minRefreshHint, maxFedRefresh], or
// defaultFedRefresh without one (SPIRE's default too); a failed fetch is
// retried after 1s, doubling up to that interval.
const (
	maxFedRefresh     = time.Hour
	defaultFedRefresh = 5 * time.Minute
	minFedRetry       = time.Second
	// fedFetchTimeout bounds one fetch, connection and body included.
	fedFetchTimeout = 30 * time.Second
)

// ErrBadFederatedBundle refuses a federated bundle (fetched, saved or
// bootstrap) that is empty, or that is another trust domain's: the last
// good one stays.
var ErrBadFederatedBundle = errors.New("unusable federated bundle")

// fedPeer is one federation block at run time: the last good bundle of
// its trust domain and what status shows of its fetches. Its lock is
// never held while taking the Signer's.
type fedPeer struct {
	cfg      FederationConfig
	path     string         // state_dir/federated/<td>.json: the last fetched bundle
	webRoots *x509.CertPool // ca_file (https_web); nil means the system's roots
	log      hclog.Logger

	mu          sync.Mutex
	bundle      *spiffebundle.Bundle // last good; never modified, only replaced; nil when none
	origin      string               // where bundle came from: "fetched", "saved" or "bootstrap"
	lastSuccess time.Time            // of the fetch that gave bundle (also restored from the saved file)
	nextRefresh time.Time
	lastErr     string
	lastErrAt   time.Time
	failures    int // consecutive
}

// savedFederated is the file a fetched bundle is kept in: public data.
type savedFederated struct {
	TrustDomain string          `json:"trust_domain"`
	FetchedAt   time.Time       `json:"fetched_at"`
	Bundle      json.RawMessage `json:"bundle"` // the SPIFFE bundle as fetched (JWKS)
}

// newFedPeer loads what the signer trusts of cfg's trust domain before its
// first fetch: the bundle saved by the last run, else bootstrap_bundle. An
// https_spiffe endpoint cannot be authenticated without one of them.
func newFedPeer(cfg FederationConfig, stateDir string, log hclog.Logger) (*fedPeer, error) {
	td := cfg.TrustDomain
	p := &fedPeer{cfg: cfg, path: filepath.Join(stateDir, "federated", td.Name()+".json"), log: log.With("trust_domain", td.Name())}
	if cfg.CAFile != "" {
		roots, err := x509bundle.Load(td, cfg.CAFile)
		if err != nil || len(roots.X509Authorities()) == 0 {
			return nil, fmt.Errorf("federation %s: ca_file %s: no PEM certificate read: %v", td.Name(), cfg.CAFile, err)
		}
		p.webRoots = x509.NewCertPool()
		for _, c := range roots.X509Authorities() {
			p.webRoots.AddCert(c)
		}
	}
	saved, at, err := loadFederated(p.path, td, cfg.Profile)
	if err != nil {
		return nil, fmt.Errorf("federation %s: %w", td.Name(), err)
	}
	switch {
	case saved != nil:
		p.bundle, p.origin, p.lastSuccess = saved, "saved", at
	case cfg.BootstrapBundle != "":
		b, err := loadBootstrap(cfg.BootstrapBundle, td, cfg.Profile)
		if err != nil {
			return nil, fmt.Errorf("federation %s: bootstrap_bundle: %w", td.Name(), err)
		}
		p.bundle, p.origin = b, "bootstrap"
	case cfg.Profile == ProfileHTTPSSPIFFE:
		return nil, fmt.Errorf("federation %s: no bootstrap_bundle and no bundle saved in %s: nothing can authenticate %s (set bootstrap_bundle to that trust domain's bundle)", td.Name(), p.path, cfg.URL)
	}
	return p, nil
}

// addFederation starts trusting fc's trust domain with what newFedPeer
// loads; Serve starts its fetcher. Called before Serve only (tests add a
// block whose bootstrap bundle exists only once both signers are made).
func (s *Signer) addFederation(fc FederationConfig) error {
	p, err := newFedPeer(fc, s.cfg.StateDir, s.log.Named("federation"))
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.feds = append(s.feds, p)
	if s.cfg.federation(fc.TrustDomain) == nil {
		s.cfg.Federations = append(s.cfg.Federations, fc)
	}
	if b := p.current(); b != nil {
		s.fedBundles[fc.TrustDomain] = federatedMessage(b)
	}
	if s.pol != nil {
		s.fedWarnings = s.federationWarningsLocked()
	}
	return nil
}

// loadFederated reads the bundle a previous run saved at path; nil when
// there is none. A file that is not td's is an error: it is state_dir's,
// and it is never silently replaced by trust in something else.
func loadFederated(path string, td spiffeid.TrustDomain, profile string) (*spiffebundle.Bundle, time.Time, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("read saved bundle: %w", err)
	}
	var s savedFederated
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, time.Time{}, fmt.Errorf("saved bundle %s: %w: %v", path, ErrBadFederatedBundle, err)
	}
	if s.TrustDomain != td.Name() {
		return nil, time.Time{}, fmt.Errorf("saved bundle %s is trust domain %q's, not %q: %w", path, s.TrustDomain, td.Name(), ErrBadFederatedBundle)
	}
	b, err := spiffebundle.Parse(td, s.Bundle)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("saved bundle %s: %w: %v", path, ErrBadFederatedBundle, err)
	}
	if err := checkFederated(b, td, profile); err != nil {
		return nil, time.Time{}, fmt.Errorf("saved bundle %s: %w", path, err)
	}
	return b, s.FetchedAt, nil
}

// loadBootstrap reads a bootstrap_bundle: a SPIFFE bundle (JSON, as a
// bundle endpoint serves it, or `spire-server bundle show -format spiffe`
// prints it) or PEM CA certificates (a Lanyard signer's bundle_path).
func loadBootstrap(path string, td spiffeid.TrustDomain, profile string) (*spiffebundle.Bundle, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var b *spiffebundle.Bundle
	if trimmed := bytes.TrimSpace(data); len(trimmed) > 0 && trimmed[0] == '{' {
		b, err = spiffebundle.Parse(td, data)
	} else {
		var xb *x509bundle.Bundle
		if xb, err = x509bundle.Parse(td, data); err == nil {
			b = spiffebundle.FromX509Bundle(xb)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", path, ErrBadFederatedBundle, err)
	}
	if err := checkFederated(b, td, profile); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

// checkFederated refuses a bundle that cannot be td's, or that is empty.
// The SPIFFE bundle format does not name its trust domain, so the CAs
// are asked: a SPIFFE CA names its trust domain in its URI SAN (SPIRE's
// and Lanyard's do), and a CA naming another one means the endpoint
// serves the wrong bundle. An https_spiffe bundle needs an X.509
// authority: without one, the next fetch could authenticate nothing.
func checkFederated(b *spiffebundle.Bundle, td spiffeid.TrustDomain, profile string) error {
	cas := b.X509Authorities()
	if b.Empty() {
		return fmt.Errorf("%w: it holds no X.509 or JWT authority", ErrBadFederatedBundle)
	}
	if profile == ProfileHTTPSSPIFFE && len(cas) == 0 {
		return fmt.Errorf("%w: it holds no X.509 authority to authenticate the https_spiffe endpoint with", ErrBadFederatedBundle)
	}
	for _, c := range cas {
		for _, u := range c.URIs {
			if id, err := spiffeid.FromURI(u); err == nil && id.TrustDomain() != td {
				return fmt.Errorf("%w: X.509 authority %q is trust domain %q's, not %q", ErrBadFederatedBundle, c.Subject.String(), id.TrustDomain().Name(), td.Name())
			}
		}
	}
	return nil
}

// current is the last good bundle, or nil.
func (p *fedPeer) current() *spiffebundle.Bundle {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bundle
}

// interval is how long the last good bundle may be kept before the next
// fetch: its refresh hint within bounds.
func (p *fedPeer) interval(floor time.Duration) time.Duration {
	b := p.current()
	if b == nil {
		return defaultFedRefresh
	}
	hint, ok := b.RefreshHint()
	if !ok || hint <= 0 {
		return defaultFedRefresh
	}
	return min(max(hint, floor), maxFedRefresh)
}

// fetch gets the bundle from the endpoint with go-spiffe's federation
// client (the Trust Domain and Bundle specification's reference client).
// An https_spiffe endpoint is authenticated by the last good bundle, so a
// CA rotation of the peer is followed fetch after fetch. The body is read
// only from an endpoint that authenticated, within fedFetchTimeout.
func (p *fedPeer) fetch(ctx context.Context) (*spiffebundle.Bundle, error) {
	ctx, cancel := context.WithTimeout(ctx, fedFetchTimeout)
	defer cancel()
	var opt federation.FetchOption
	switch p.cfg.Profile {
	case ProfileHTTPSSPIFFE:
		last := p.current()
		if last == nil {
			return nil, errors.New("no bundle to authenticate the endpoint with")
		}
		opt = federation.WithSPIFFEAuth(last, p.cfg.EndpointID)
	default:
		opt = federation.WithWebPKIRoots(p.webRoots)
	}
	b, err := federation.FetchBundle(ctx, p.cfg.TrustDomain, p.cfg.URL, opt)
	if err != nil {
		return nil, err
	}
	if err := checkFederated(b, p.cfg.TrustDomain, p.cfg.Profile); err != nil {
		return nil, err
	}
	return b, nil
}

// save writes b, fetched at, to p.path atomically (public data), so a
// restart trusts what was last fetched.
func (p *fedPeer) save(b *spiffebundle.Bundle, at time.Time) error {
	doc, err := b.Marshal()
	if err != nil {
		return fmt.Errorf("encode bundle: %w", err)
	}
	data, err := json.MarshalIndent(savedFederated{TrustDomain: p.cfg.TrustDomain.Name(), FetchedAt: at.UTC(), Bundle: doc}, "", "  ")
	if err != nil {
		return fmt.Errorf("encode bundle: %w", err)
	}
	return writeAtomic(p.path, append(data, '\n'))
}

// runFederation fetches p's bundle at once, then at its refresh interval,
// retrying failures with backoff, until ctx ends.
func (s *Signer) runFederation(ctx context.Context, p *fedPeer) error {
	p.log.Info("federation started", "url", p.cfg.URL, "profile", p.cfg.Profile, "trusting", orNone(p.origin))
	var retry time.Duration
	for {
		wait := s.refreshFederated(ctx, p, &retry)
		if ctx.Err() != nil {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// refreshFederated runs one fetch of p and returns how long to wait for
// the next: the refresh interval after a success, the next backoff step
// (kept in retry) after a failure. A failure keeps the last good bundle.
func (s *Signer) refreshFederated(ctx context.Context, p *fedPeer, retry *time.Duration) time.Duration {
	b, err := p.fetch(ctx)
	if ctx.Err() != nil {
		return 0
	}
	now := time.Now()
	if err != nil {
		*retry = min(max(2**retry, minFedRetry), p.interval(s.fedFloor))
		p.mu.Lock()
		p.failures++
		p.lastErr, p.lastErrAt, p.nextRefresh = err.Error(), now, now.Add(*retry)
		failures := p.failures
		p.mu.Unlock()
		p.log.Warn("federated bundle fetch failed; the last good bundle stays", "url", p.cfg.URL, "failures", failures,
			"retry_in", retry.String(), "error", err.Error())
		return *retry
	}
	*retry = 0
	old := p.current()
	contentChanged := old == nil || !old.X509Bundle().Equal(b.X509Bundle()) || !old.JWTBundle().Equal(b.JWTBundle())
	if old == nil || !old.Equal(b) {
		if err := p.save(b, now); err != nil {
			// Still trusted in memory: the file only serves a restart.
			p.log.Error("federated bundle not saved; a restart trusts the previous one", "path", p.path, "error", err.Error())
		}
	}
	// Agents are given the bundle before status says it is in use.
	if contentChanged {
		s.setFederated(p.cfg.TrustDomain, federatedMessage(b))
	}
	p.mu.Lock()
	p.bundle, p.origin, p.lastSuccess, p.failures = b, "fetched", now, 0
	p.mu.Unlock()
	next := p.interval(s.fedFloor)
	p.mu.Lock()
	p.nextRefresh = now.Add(next)
	p.mu.Unlock()
	if contentChanged {
		oldSeq, _ := sequenceOf(old)
		newSeq, _ := b.SequenceNumber()
		p.log.Info("federated bundle changed", "sequence", newSeq, "previous_sequence", oldSeq,
			"cas", len(b.X509Authorities()), "jwt_keys", len(b.JWTAuthorities()), "next_refresh_in", next.String())
	}
	return next
}

func sequenceOf(b *spiffebundle.Bundle) (uint64, bool) {
	if b == nil {
		return 0, false
	}
	return b.SequenceNumber()
}

// setFederated makes msg the bundle of td that agents are sent, and wakes
// every Sync stream; only streams whose entries federate with td send it.
func (s *Signer) setFederated(td spiffeid.TrustDomain, msg *signerpb.Bundle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fedBundles[td] = msg
	s.notifyLocked()
}

// federatedMessage is b as agents receive it: X.509 CAs in DER, JWT keys
// in PKIX DER sorted by key ID (no expiry: the peer's bundle says none),
// sequence = its spiffe_sequence.
func federatedMessage(b *spiffebundle.Bundle) *signerpb.Bundle {
	seq, _ := b.SequenceNumber()
	m := &signerpb.Bundle{TrustDomain: b.TrustDomain().Name(), Sequence: seq}
	for _, c := range b.X509Authorities() {
		m.X509Authorities = append(m.X509Authorities, c.Raw)
	}
	keys := b.JWTAuthorities()
	kids := make([]string, 0, len(keys))
	for kid := range keys {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	for _, kid := range kids {
		der, err := x509.MarshalPKIXPublicKey(keys[kid])
		if err != nil {
			continue // a key type Go cannot encode cannot be verified with either
		}
		m.JwtAuthorities = append(m.JwtAuthorities, &signerpb.JWTAuthority{KeyId: kid, PublicKey: der})
	}
	return m
}

// federatedBundlesLocked is the federated bundles the entries of a node
// name in federates_with, of the domains the signer holds one for, sorted
// by trust domain.
func (s *Signer) federatedBundlesLocked(entries []*signerpb.Entry) []*signerpb.Bundle {
	var names []string
	for _, e := range entries {
		names = append(names, e.GetFederatesWith()...)
	}
	slices.Sort(names)
	var out []*signerpb.Bundle
	for _, n := range slices.Compact(names) {
		td, err := spiffeid.TrustDomainFromString(n)
		if err != nil {
			continue
		}
		if b := s.fedBundles[td]; b != nil {
			out = append(out, b)
		}
	}
	return out
}

// federationWarningsLocked is what the policy in force names in
// federates_with without a federation block: the policy loads (the config
// may follow), the entries get no bundle of it, and status says so.
func (s *Signer) federationWarningsLocked() []string {
	var warnings []string
	missing := map[spiffeid.TrustDomain][]string{}
	var order []spiffeid.TrustDomain
	for _, w := range s.pol.Workloads {
		for _, td := range w.FederatesWith {
			if s.cfg.federation(td) != nil {
				continue
			}
			if _, ok := missing[td]; !ok {
				order = append(order, td)
			}
			missing[td] = append(missing[td], w.Name)
		}
	}
	for _, td := range order {
		msg := "federates_with " + td.Name() + ": no federation block"
		warnings = append(warnings, msg)
		s.log.Warn("policy names a trust domain without a federation block; its entries get no bundle of it",
			"trust_domain", td.Name(), "workloads", strings.Join(missing[td], ","))
	}
	return warnings
}

// FederationStatus is one federated trust domain, as status shows it.
type FederationStatus struct {
	TrustDomain string `json:"trust_domain"`
	URL         string `json:"url"`
	Profile     string `json:"profile"`
	// Trusting says where the bundle in use came from: "fetched",
	// "saved" (by the last run), "bootstrap" or "" (none yet).
	Trusting    string    `json:"trusting"`
	LastSuccess time.Time `json:"last_success,omitzero"`
	Sequence    uint64    `json:"sequence"`
	CAs         int       `json:"cas"`
	JWTKeys     int       `json:"jwt_keys"`
	NextRefresh time.Time `json:"next_refresh,omitzero"`
	// LastError is the last failed fetch's error, at LastErrorAt; the
	// fetch is failing now when LastErrorAt is after LastSuccess.
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	Failures    int       `json:"consecutive_failures"`
}

// federationStatus is every federation block's status, in file order.
func (s *Signer) federationStatus() []FederationStatus {
	var out []FederationStatus
	for _, p := range s.feds {
		p.mu.Lock()
		st := FederationStatus{
			TrustDomain: p.cfg.TrustDomain.Name(), URL: p.cfg.URL, Profile: p.cfg.Profile, Trusting: p.origin,
			LastSuccess: p.lastSuccess.UTC(), NextRefresh: p.nextRefresh.UTC(),
			LastError: p.lastErr, LastErrorAt: p.lastErrAt.UTC(), Failures: p.failures,
		}
		if b := p.bundle; b != nil {
			st.Sequence, _ = b.SequenceNumber()
			st.CAs, st.JWTKeys = len(b.X509Authorities()), len(b.JWTAuthorities())
		}
		p.mu.Unlock()
		out = append(out, st)
	}
	return out
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

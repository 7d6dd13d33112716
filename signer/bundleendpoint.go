package signer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/telemetry"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// bundleEndpointMaxConns bounds the bundle endpoint's connections: it
// faces other trust domains, maybe the Internet.
const bundleEndpointMaxConns = 1024

// bundleSource is the trust bundle the bundle endpoint serves, in the
// SPIFFE format: what agents are sent (in a tier, the union of every
// replica's keys), with the bundle's sequence as spiffe_sequence and the
// configured refresh hint. It is rebuilt only when that bundle is replaced.
type bundleSource struct {
	td     spiffeid.TrustDomain
	hint   time.Duration
	bundle func() *signerpb.Bundle
	log    hclog.Logger

	mu      sync.Mutex
	lastFor *signerpb.Bundle // bundles are replaced, never modified
	built   *spiffebundle.Bundle
}

// GetBundleForTrustDomain implements spiffebundle.Source for
// federation.NewHandler.
func (b *bundleSource) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td != b.td {
		return nil, fmt.Errorf("no bundle of trust domain %q here", td.Name())
	}
	cur := b.bundle()
	b.mu.Lock()
	defer b.mu.Unlock()
	if cur != b.lastFor || b.built == nil {
		b.built, b.lastFor = b.build(cur), cur
	}
	return b.built, nil
}

// build converts the agents' bundle message. A JWT key that does not
// parse cannot be one this tier signs with, and is left out.
func (b *bundleSource) build(m *signerpb.Bundle) *spiffebundle.Bundle {
	out := spiffebundle.New(b.td)
	out.SetSequenceNumber(m.GetSequence())
	out.SetRefreshHint(b.hint)
	for _, der := range m.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			b.log.Warn("CA left out of the served bundle: not a certificate", "error", err.Error())
			continue
		}
		out.AddX509Authority(c)
	}
	for _, k := range m.GetJwtAuthorities() {
		pub, err := x509.ParsePKIXPublicKey(k.GetPublicKey())
		if err == nil {
			err = out.AddJWTAuthority(k.GetKeyId(), pub)
		}
		if err != nil {
			b.log.Warn("JWT key left out of the served bundle", "kid", k.GetKeyId(), "error", err.Error())
		}
	}
	return out
}

// bundleEndpointHandler serves the bundle at "/" to GET only, as SPIRE's
// endpoint does; go-spiffe's handler (the specification's reference
// encoder) writes the body.
func bundleEndpointHandler(src *bundleSource) (http.Handler, error) {
	inner, err := federation.NewHandler(src.td, src)
	if err != nil {
		return nil, fmt.Errorf("bundle endpoint: %w", err)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", "GET")
			http.Error(w, "method not allowed: use GET", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Cache-Control", "no-store") // the refresh hint, not a cache, says when to come back
		w.Header().Set("X-Content-Type-Options", "nosniff")
		inner.ServeHTTP(w, r)
	}), nil
}

// listenBundleEndpoint opens bundle_endpoint's listen_address with TLS:
// the signer's own SVID (https_spiffe), or the tls block's certificate,
// re-read when it changes (https_web). nil when there is no block.
func (s *Signer) listenBundleEndpoint() (net.Listener, error) {
	b := s.cfg.BundleEndpoint
	if b == nil {
		return nil, nil
	}
	ln, certs, err := s.listenPublic("bundle endpoint", "bundle_endpoint", b.ListenAddress, b.CertFile, b.KeyFile, bundleEndpointMaxConns)
	if err != nil || certs != nil {
		return ln, err
	}
	return tls.NewListener(ln, &tls.Config{
		MinVersion: tls.VersionTLS12, // what SPIRE's federation client speaks
		NextProtos: []string{"h2", "http/1.1"},
		// The SVID the agents know the signer by, reissued as the CA
		// rotates: peers authenticate it with the bundle they last fetched.
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.serverCertificate(time.Now()) },
	}), nil
}

// serveBundleEndpoint serves the bundle on ln until ctx ends, then shuts
// down within a bound, and returns once the server has stopped.
func (s *Signer) serveBundleEndpoint(ctx context.Context, ln net.Listener) error {
	log := s.log.Named("bundle_endpoint")
	h, err := bundleEndpointHandler(&bundleSource{td: s.cfg.TrustDomain, hint: s.bundleHint, log: log, bundle: func() *signerpb.Bundle {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.agentBundle
	}})
	if err != nil {
		ln.Close()
		return err
	}
	log.Info("bundle endpoint serving", "address", ln.Addr().String(), "profile", s.cfg.BundleEndpoint.Profile(),
		"endpoint_spiffe_id", s.id.String(), "refresh_hint", s.bundleHint.String())
	if err := telemetry.ServeServer(ctx, publicServer(h, log), ln); err != nil {
		return fmt.Errorf("bundle endpoint: %w", err)
	}
	return nil
}

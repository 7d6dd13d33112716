package signer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/telemetry"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"golang.org/x/net/netutil"
)

// Paths of OIDC discovery, under the issuer URL's own path. The discovery
// document's place is fixed by OpenID Connect Discovery 1.0; the JWKS's
// is ours, named by the document's jwks_uri.
const (
	oidcConfigPath = "/.well-known/openid-configuration"
	oidcKeysPath   = "/keys"
)

// Bounds of the OIDC listener, which may face the Internet: every
// connection and request it holds is capped in count, size and time.
const (
	oidcMaxConns       = 1024
	oidcMaxHeaderBytes = 8 << 10
)

// oidcMaxAge is how long a relying party or a proxy may cache the
// discovery document and the JWKS. A new JWT key is published
// ca_publish_lead before it signs its first token; a cache that keeps the
// JWKS at most half that lead refreshes before then with half the lead to
// spare (for a proxy's own caching, a retry, a slow clock), so no relying
// party that honours the header sees a token whose key it has not yet
// fetched. The cap keeps key removals prompt with long leads (4h by
// default); the floor spares the endpoint with very short test leads,
// where relying parties that refetch on an unknown kid (most libraries,
// go-oidc included) still catch up.
func oidcMaxAge(lead time.Duration) time.Duration {
	return min(max(lead/2, 10*time.Second), 5*time.Minute)
}

// oidcDoc is one response body and its strong ETag.
type oidcDoc struct {
	body []byte
	etag string
}

func newOIDCDoc(body []byte) oidcDoc {
	sum := sha256.Sum256(body)
	return oidcDoc{body: body, etag: `"` + base64.RawURLEncoding.EncodeToString(sum[:16]) + `"`}
}

// oidcHandler serves the discovery document and the JWKS of the keys
// agents validate JWT-SVIDs with: the bundle the signer pushes (in a tier,
// the union of every replica's keys), so every replica serves the same
// JWKS, byte for byte, with the same ETag.
type oidcHandler struct {
	base         string // the issuer URL's path: "" or "/a/b"
	cacheControl string
	discovery    oidcDoc
	bundle       func() *signerpb.Bundle // the agents' bundle now
	log          hclog.Logger

	mu      sync.Mutex
	lastFor *signerpb.Bundle // the bundle jwks was built from (bundles are replaced, never modified)
	jwks    oidcDoc
}

// newOIDCHandler serves issuer's discovery with keys from bundle, cached
// for oidcMaxAge(lead).
func newOIDCHandler(issuer string, lead time.Duration, bundle func() *signerpb.Bundle, log hclog.Logger) (*oidcHandler, error) {
	u, err := url.Parse(issuer)
	if err != nil {
		return nil, fmt.Errorf("oidc discovery: issuer: %w", err)
	}
	doc, err := json.MarshalIndent(map[string]any{
		"issuer":   issuer,
		"jwks_uri": issuer + oidcKeysPath,
		// Relying-party libraries assume RS256 when this is absent.
		"id_token_signing_alg_values_supported": []string{string(jose.ES256)},
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss"},
	}, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("oidc discovery: encode document: %w", err)
	}
	return &oidcHandler{
		base:         u.Path,
		cacheControl: "public, max-age=" + strconv.Itoa(int(oidcMaxAge(lead)/time.Second)),
		discovery:    newOIDCDoc(append(doc, '\n')),
		bundle:       bundle,
		log:          log,
	}, nil
}

func (h *oidcHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var doc oidcDoc
	switch r.URL.Path {
	case h.base + oidcConfigPath:
		doc = h.discovery
	case h.base + oidcKeysPath:
		doc = h.currentJWKS()
	default:
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed: use GET or HEAD", http.StatusMethodNotAllowed)
		return
	}
	hdr := w.Header()
	hdr.Set("Cache-Control", h.cacheControl)
	hdr.Set("ETag", doc.etag)
	if etagMatches(r.Header.Values("If-None-Match"), doc.etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Content-Length", strconv.Itoa(len(doc.body)))
	hdr.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(doc.body)
	}
}

// etagMatches is If-None-Match's weak comparison (RFC 9110 13.1.2): "*",
// or any listed tag equal to etag once a W/ prefix is set aside.
func etagMatches(values []string, etag string) bool {
	for _, v := range values {
		for tag := range strings.SplitSeq(v, ",") {
			tag = strings.TrimSpace(tag)
			if tag == "*" || strings.TrimPrefix(tag, "W/") == etag {
				return true
			}
		}
	}
	return false
}

// currentJWKS is the JWKS of the bundle now, rebuilt only when the bundle
// was replaced.
func (h *oidcHandler) currentJWKS() oidcDoc {
	b := h.bundle()
	h.mu.Lock()
	defer h.mu.Unlock()
	if b != h.lastFor || h.jwks.body == nil {
		h.jwks = newOIDCDoc(h.buildJWKS(b))
		h.lastFor = b
	}
	return h.jwks
}

// buildJWKS encodes the bundle's JWT keys as a JWKS for relying parties:
// "use": "sig" (they know no "jwt-svid") and "alg": "ES256", sorted by kid
// so that replicas holding the same keys serve the same bytes. A key that
// is not P-256 cannot be one this tier signs with and is left out.
func (h *oidcHandler) buildJWKS(b *signerpb.Bundle) []byte {
	auths := slices.Clone(b.GetJwtAuthorities())
	slices.SortFunc(auths, func(a, c *signerpb.JWTAuthority) int { return strings.Compare(a.GetKeyId(), c.GetKeyId()) })
	set := jose.JSONWebKeySet{Keys: make([]jose.JSONWebKey, 0, len(auths))}
	for _, a := range auths {
		pub, err := x509.ParsePKIXPublicKey(a.GetPublicKey())
		if ec, ok := pub.(*ecdsa.PublicKey); err != nil || !ok || ec.Curve != elliptic.P256() {
			h.log.Warn("JWT key left out of the OIDC JWKS: not a P-256 public key", "kid", a.GetKeyId())
			continue
		}
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: pub, KeyID: a.GetKeyId(), Use: "sig", Algorithm: string(jose.ES256)})
	}
	body, err := json.MarshalIndent(set, "", "  ")
	if err != nil {
		// Only a key go-jose cannot encode gets here, and every key is
		// a checked P-256 one: serve no keys rather than a broken set.
		h.log.Error("OIDC JWKS not encoded", "error", err)
		body = []byte(`{"keys":[]}`)
	}
	return append(body, '\n')
}

// listenOIDC opens oidc_discovery's listen_address, with TLS when the
// block has a tls block; nil when there is no oidc_discovery block.
func (s *Signer) listenOIDC() (net.Listener, error) {
	o := s.cfg.OIDC
	if o == nil {
		return nil, nil
	}
	ln, _, err := s.listenPublic("oidc discovery", "oidc", o.ListenAddress, o.CertFile, o.KeyFile, oidcMaxConns)
	if err != nil {
		return nil, err
	}
	return ln, nil
}

// serveOIDC serves OIDC discovery on ln until ctx ends, then shuts down
// within a bound, and returns once the server has stopped.
func (s *Signer) serveOIDC(ctx context.Context, ln net.Listener) error {
	log := s.log.Named("oidc")
	h, err := newOIDCHandler(s.cfg.OIDC.Issuer, s.cfg.CAPublishLead, func() *signerpb.Bundle {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.agentBundle
	}, log)
	if err != nil {
		ln.Close()
		return err
	}
	log.Info("oidc discovery serving", "address", ln.Addr().String(), "issuer", s.cfg.OIDC.Issuer,
		"tls", s.cfg.OIDC.CertFile != "", "max_age", h.cacheControl)
	if err := telemetry.ServeServer(ctx, publicServer(h, log), ln); err != nil {
		return fmt.Errorf("oidc discovery: %w", err)
	}
	return nil
}

// publicServer is an HTTP server for a port the world may reach (OIDC
// discovery, the federation bundle endpoint): bounded reads, writes,
// idle connections and headers, and the errors of scanners and broken
// TLS clients logged at Debug, not on stderr.
func publicServer(h http.Handler, log hclog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    oidcMaxHeaderBytes,
		ErrorLog:          log.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug}),
	}
}

// listenPublic opens addr for a public endpoint, at most maxConns
// connections at once, with TLS from certFile/keyFile (re-read when they
// change) when certFile is set; what names the endpoint in errors.
func (s *Signer) listenPublic(what, logName, addr, certFile, keyFile string, maxConns int) (net.Listener, *certReloader, error) {
	var certs *certReloader
	if certFile != "" {
		certs = &certReloader{certFile: certFile, keyFile: keyFile, log: s.log.Named(logName)}
		if _, err := certs.load(); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", what, err)
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: listen on %s: %w", what, addr, err)
	}
	ln = netutil.LimitListener(ln, maxConns)
	if certs != nil {
		ln = certs.listener(ln)
	}
	return ln, certs, nil
}

package workloadapi

import (
	"cmp"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// Default SDS resource names: SPIRE's, so that an Envoy bootstrap written
// for a SPIRE agent works unchanged against Lanyard's socket.
const (
	DefaultSDSSVIDName       = "default"
	DefaultSDSBundleName     = "ROOTCA"
	DefaultSDSAllBundlesName = "ALL"
)

// spiffeValidatorName is the Envoy extension that checks a peer's chain
// against the bundle of the trust domain its SPIFFE ID names (Envoy 1.18
// and later).
const spiffeValidatorName = "envoy.tls.cert_validator.spiffe"

// disableValidatorKey is the Envoy node metadata key with which one Envoy
// overrides SDSConfig.DisableSPIFFECertValidation, as with SPIRE.
const disableValidatorKey = "disable_spiffe_cert_validation"

// secretTypeURL is the type of every resource SDS serves.
var secretTypeURL = "type.googleapis.com/" + string((&tlsv3.Secret{}).ProtoReflect().Descriptor().FullName())

// SDSConfig shapes the Envoy SDS v3 service served on the socket (the
// agent config's sds block). Its zero value serves SPIRE's names.
type SDSConfig struct {
	// TrustDomain is the agent's own: DefaultBundleName serves its
	// bundle. Zero leaves that name unserved.
	TrustDomain spiffeid.TrustDomain
	// DefaultSVIDName names the caller's first X.509-SVID as a
	// tls_certificate ("default").
	DefaultSVIDName string
	// DefaultBundleName names the own trust domain's bundle as a
	// validation_context with trusted_ca ("ROOTCA").
	DefaultBundleName string
	// DefaultAllBundlesName names every bundle held, as a
	// validation_context for Envoy's SPIFFE certificate validator ("ALL").
	DefaultAllBundlesName string
	// DisableSPIFFECertValidation serves DefaultAllBundlesName as one
	// trusted_ca holding every bundle's CAs instead, for an Envoy that
	// lacks the SPIFFE validator. One Envoy may override it with its node
	// metadata key disable_spiffe_cert_validation; an Envoy older than
	// 1.18 (by its node's build version) always gets the trusted_ca form.
	DisableSPIFFECertValidation bool
}

func (c SDSConfig) withDefaults() SDSConfig {
	c.DefaultSVIDName = cmp.Or(c.DefaultSVIDName, DefaultSDSSVIDName)
	c.DefaultBundleName = cmp.Or(c.DefaultBundleName, DefaultSDSBundleName)
	c.DefaultAllBundlesName = cmp.Or(c.DefaultAllBundlesName, DefaultSDSAllBundlesName)
	return c
}

// spiffeValidator reports whether node's Envoy gets DefaultAllBundlesName
// as a SPIFFE validator config (else as one trusted_ca).
func (c SDSConfig) spiffeValidator(node *corev3.Node) bool {
	disabled := c.DisableSPIFFECertValidation
	if v, ok := node.GetMetadata().GetFields()[disableValidatorKey]; ok {
		// A value that is not a boolean is ignored, as SPIRE does.
		switch v := v.GetKind().(type) {
		case *structpb.Value_BoolValue:
			disabled = v.BoolValue
		case *structpb.Value_StringValue:
			if b, err := strconv.ParseBool(v.StringValue); err == nil {
				disabled = b
			}
		}
	}
	if bv := node.GetUserAgentBuildVersion(); bv != nil {
		v := bv.GetVersion()
		if v.GetMajorNumber() < 1 || (v.GetMajorNumber() == 1 && v.GetMinorNumber() < 18) {
			return false
		}
	}
	return !disabled
}

// sdsBundle is one trust domain's X.509 bundle, as DER certificates.
type sdsBundle struct {
	td  spiffeid.TrustDomain
	der []byte
}

// sdsResource is one secret to serve: a tls_certificate (svid set) or a
// validation_context of one or more bundles.
type sdsResource struct {
	name      string
	svid      *workload.X509SVID
	bundles   []sdsBundle
	validator bool // the bundles as a SPIFFE validator config
}

// sdsSet is what one request resolves to at one instant.
type sdsSet struct {
	resources []sdsResource
	unknown   []string // requested names that resolve to nothing
	version   string
}

// resolve maps the requested names onto what the caller may have now:
// its SVIDs (in entry order) and the bundles held. No name (a wildcard
// request) means everything, each under its SPIFFE ID or trust domain ID,
// as SPIRE serves it. A name that resolves to nothing is listed in
// unknown and left out of the answer: Envoy waits for it, and the stream
// stays.
func (c SDSConfig) resolve(names []string, svids []*workload.X509SVID, bundleMap map[string][]byte, validator bool) sdsSet {
	bundles := sortedBundles(bundleMap)
	var set sdsSet
	if len(names) == 0 {
		for _, b := range bundles {
			set.resources = append(set.resources, sdsResource{name: b.td.IDString(), bundles: []sdsBundle{b}})
		}
		for _, s := range svids {
			set.resources = append(set.resources, sdsResource{name: s.GetSpiffeId(), svid: s})
		}
	}
	bundleOf := func(td spiffeid.TrustDomain) []sdsBundle {
		for _, b := range bundles {
			if b.td == td {
				return []sdsBundle{b}
			}
		}
		return nil
	}
	for _, name := range names {
		r := sdsResource{name: name}
		switch name {
		case c.DefaultSVIDName:
			if len(svids) > 0 {
				r.svid = svids[0]
			}
		case c.DefaultBundleName:
			if !c.TrustDomain.IsZero() {
				r.bundles = bundleOf(c.TrustDomain)
			}
		case c.DefaultAllBundlesName:
			r.bundles, r.validator = bundles, validator
		default:
			r.svid, r.bundles = lookupName(name, svids, bundleOf)
		}
		if r.svid == nil && len(r.bundles) == 0 {
			set.unknown = append(set.unknown, name)
			continue
		}
		set.resources = append(set.resources, r)
	}
	set.version = set.hash(names)
	return set
}

// lookupName resolves a name that is none of the configured ones: a
// SPIFFE ID among the caller's SVIDs, or a trust domain, by name or as
// spiffe://td, whose bundle is held.
func lookupName(name string, svids []*workload.X509SVID, bundleOf func(spiffeid.TrustDomain) []sdsBundle) (*workload.X509SVID, []sdsBundle) {
	if strings.HasPrefix(name, "spiffe://") {
		id, err := spiffeid.FromString(name)
		if err != nil {
			return nil, nil
		}
		if id.Path() == "" {
			return nil, bundleOf(id.TrustDomain())
		}
		for _, s := range svids {
			if s.GetSpiffeId() == id.String() {
				return s, nil
			}
		}
		return nil, nil
	}
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		return nil, nil
	}
	return nil, bundleOf(td)
}

// sortedBundles turns a bundles map (keyed by trust domain ID, as the
// Workload API's) into a list ordered by trust domain, skipping keys that
// are not trust domains.
func sortedBundles(m map[string][]byte) []sdsBundle {
	out := make([]sdsBundle, 0, len(m))
	for k, der := range m {
		td, err := spiffeid.TrustDomainFromString(k)
		if err != nil || len(der) == 0 {
			continue
		}
		out = append(out, sdsBundle{td: td, der: der})
	}
	slices.SortFunc(out, func(a, b sdsBundle) int { return strings.Compare(a.td.Name(), b.td.Name()) })
	return out
}

// hash is the set's version_info: a digest of what was asked and of the
// public half of what answers it (names, certificates, bundles, form), so
// equal content has equal versions on every stream and in FetchSecrets,
// and a stream pushes only when its answer really changed. Keys are left
// out: a new key always comes with a new certificate.
func (s sdsSet) hash(requested []string) string {
	h := sha256.New()
	field := func(b []byte) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	for _, n := range requested {
		field([]byte(n))
	}
	field(nil)
	for _, r := range s.resources {
		field([]byte(r.name))
		field(r.svid.GetX509Svid())
		for _, b := range r.bundles {
			field([]byte(b.td.Name()))
			field(b.der)
		}
		field([]byte{boolByte(r.validator)})
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

// errBadSecret means the Source held a certificate or key that does not
// parse: a bug, never the caller's fault.
var errBadSecret = errors.New("malformed certificate or key")

// secret builds the Envoy Secret for r. The private key is copied into the
// returned message only; the caller sends it and lets it go.
func (r sdsResource) secret() (*anypb.Any, error) {
	s := &tlsv3.Secret{Name: r.name}
	if r.svid != nil {
		chain, err := derToPEM(r.svid.GetX509Svid())
		if err != nil {
			return nil, fmt.Errorf("secret %q: %w", r.name, err)
		}
		key := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: r.svid.GetX509SvidKey()})
		s.Type = &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(chain),
			PrivateKey:       inline(key),
		}}
		return anypb.New(s)
	}
	vc := &tlsv3.CertificateValidationContext{}
	if r.validator {
		cfg := &tlsv3.SPIFFECertValidatorConfig{}
		for _, b := range r.bundles {
			cas, err := derToPEM(b.der)
			if err != nil {
				return nil, fmt.Errorf("secret %q: bundle of %s: %w", r.name, b.td, err)
			}
			cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{Name: b.td.Name(), TrustBundle: inline(cas)})
		}
		typed, err := anypb.New(cfg)
		if err != nil {
			return nil, fmt.Errorf("secret %q: %w", r.name, err)
		}
		vc.CustomValidatorConfig = &corev3.TypedExtensionConfig{Name: spiffeValidatorName, TypedConfig: typed}
	} else {
		var cas []byte
		for _, b := range r.bundles {
			p, err := derToPEM(b.der)
			if err != nil {
				return nil, fmt.Errorf("secret %q: bundle of %s: %w", r.name, b.td, err)
			}
			cas = append(cas, p...)
		}
		vc.TrustedCa = inline(cas)
	}
	s.Type = &tlsv3.Secret_ValidationContext{ValidationContext: vc}
	return anypb.New(s)
}

func inline(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

// derToPEM turns concatenated DER certificates into PEM blocks.
func derToPEM(der []byte) ([]byte, error) {
	certs, err := x509.ParseCertificates(der)
	if err != nil || len(certs) == 0 {
		return nil, errBadSecret
	}
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out, nil
}

// audit returns what the audit line says of a set: the names served, the
// SPIFFE IDs and serials of the SVIDs in it (never a key) and the trust
// domains of its bundles.
func (s sdsSet) audit() (names, ids, serials, tds []string) {
	for _, r := range s.resources {
		names = append(names, r.name)
		if r.svid != nil {
			ids = append(ids, r.svid.GetSpiffeId())
			serials = append(serials, leafSerial(r.svid.GetX509Svid()))
		}
		for _, b := range r.bundles {
			if !slices.Contains(tds, b.td.Name()) {
				tds = append(tds, b.td.Name())
			}
		}
	}
	return names, ids, serials, tds
}

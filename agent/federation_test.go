package agent

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var otherTD = spiffeid.RequireTrustDomainFromString("other.org")

// fedJWTKey is a JWT signing key of a federated trust domain.
type fedJWTKey struct {
	kid string
	key *ecdsa.PrivateKey
}

func newFedJWTKey(t testing.TB, kid string) fedJWTKey {
	t.Helper()
	return fedJWTKey{kid: kid, key: testca.Key(t)}
}

func (k fedJWTKey) authority(t testing.TB) *signerpb.JWTAuthority {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(k.key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return &signerpb.JWTAuthority{KeyId: k.kid, PublicKey: der}
}

// mint signs a JWT-SVID for sub and aud with this key, valid for 5 min.
func (k fedJWTKey) mint(t testing.TB, sub string, aud ...string) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: k.key, KeyID: k.kid}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tok, err := jwt.Signed(sig).Claims(jwt.Claims{Subject: sub, Audience: aud,
		IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(5 * time.Minute))}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// wireFed is a federated bundle as the signer sends it.
func wireFed(t testing.TB, td string, seq uint64, cas []*testca.CA, keys ...fedJWTKey) *signerpb.Bundle {
	t.Helper()
	b := &signerpb.Bundle{TrustDomain: td, Sequence: seq}
	for _, ca := range cas {
		b.X509Authorities = append(b.X509Authorities, ca.Cert.Raw)
	}
	for _, k := range keys {
		b.JwtAuthorities = append(b.JwtAuthorities, k.authority(t))
	}
	return b
}

func fedEntry(id string, rev uint64, federates []string, selectors ...string) *entry {
	e := testEntry(id, rev, selectors...)
	for _, name := range federates {
		e.FederatesWith = append(e.FederatesWith, spiffeid.RequireTrustDomainFromString(name))
	}
	return e
}

// TestFederatedFromRefusesBadBundles: each malformed federated bundle, or
// one claiming the agent's own trust domain, is refused with a log line
// that names it, and the good ones of the same message still apply.
func TestFederatedFromRefusesBadBundles(t *testing.T) {
	ca := testca.New(t, "other CA", otherTD)
	good := wireFed(t, "third.org", 1, []*testca.CA{testca.New(t, "third CA", spiffeid.RequireTrustDomainFromString("third.org"))})
	tests := []struct {
		name        string
		bad         *signerpb.Bundle
		wantRefused []string // domains whose last good bundle is kept
		wantLog     string
	}{
		{name: "own trust domain", bad: wireFed(t, "example.org", 1, []*testca.CA{ca}),
			wantLog: "federated bundle of the agent's own trust domain"},
		{name: "trust domain not a name", bad: wireFed(t, "Not A Domain!", 1, []*testca.CA{ca}),
			wantLog: `trust_domain="Not A Domain!"`},
		{name: "CA does not parse", bad: &signerpb.Bundle{TrustDomain: "other.org", X509Authorities: [][]byte{[]byte("junk")}},
			wantRefused: []string{"other.org"}, wantLog: "parse X.509 authority"},
		{name: "JWT key does not parse", bad: &signerpb.Bundle{TrustDomain: "other.org", X509Authorities: [][]byte{ca.Cert.Raw},
			JwtAuthorities: []*signerpb.JWTAuthority{{KeyId: "k", PublicKey: []byte("junk")}}},
			wantRefused: []string{"other.org"}, wantLog: `JWT key \"k\"`},
		{name: "JWT key without kid", bad: &signerpb.Bundle{TrustDomain: "other.org", X509Authorities: [][]byte{ca.Cert.Raw},
			JwtAuthorities: []*signerpb.JWTAuthority{{PublicKey: newFedJWTKey(t, "").authority(t).GetPublicKey()}}},
			wantRefused: []string{"other.org"}, wantLog: "JWT key"},
		{name: "no authority at all", bad: &signerpb.Bundle{TrustDomain: "other.org", Sequence: 3},
			wantRefused: []string{"other.org"}, wantLog: "no X.509 authority and no JWT key"},
		{name: "a domain sent twice", bad: wireFed(t, "third.org", 2, []*testca.CA{ca}),
			wantLog: "trust domain sent twice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs testlog.Buffer
			log := hclog.New(&hclog.LoggerOptions{Output: &logs})
			got, refused := federatedFrom([]*signerpb.Bundle{good, tc.bad}, spiffeid.RequireTrustDomainFromString("example.org"), log)
			if len(got) != 1 || got[0].td.Name() != "third.org" || got[0].sequence != 1 {
				t.Errorf("good bundles = %v, want third.org sequence 1 only", got)
			}
			var names []string
			for _, td := range refused {
				names = append(names, td.Name())
			}
			if !slices.Equal(names, tc.wantRefused) {
				t.Errorf("refused = %v, want %v", names, tc.wantRefused)
			}
			if out := logs.String(); !strings.Contains(out, "bad federated bundle from signer") || !strings.Contains(out, tc.wantLog) {
				t.Errorf("log lacks the refusal and %q:\n%s", tc.wantLog, out)
			}
		})
	}
}

// TestCacheFederatedBundlesPerCaller: a caller whose entry federates with
// other.org gets its bundle in every response, one whose entry does not
// never does; a change of other.org's authorities rebuilds only the
// responses that carry it, a new sequence alone wakes no stream, a
// refused bundle keeps the last good one, and a domain no longer sent is
// dropped.
func TestCacheFederatedBundlesPerCaller(t *testing.T) {
	own := newTestCA(t, "own CA")
	ca1, ca2 := testca.New(t, "other CA 1", otherTD), testca.New(t, "other CA 2", otherTD)
	k1 := newFedJWTKey(t, "other-k1")
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	c.setBundle([]*x509.Certificate{own.Cert})
	if _, err := c.setJWTBundle(spiffeid.RequireTrustDomainFromString("example.org"), nil); err != nil {
		t.Fatal(err)
	}
	c.setEntries([]*entry{fedEntry("fed", 1, []string{"other.org"}, "unix:uid:1"), fedEntry("plain", 1, nil, "unix:uid:2")})
	c.putSVIDs([]*svid{testSVID(t, "fed", 1, t0, t0.Add(time.Hour)), testSVID(t, "plain", 1, t0, t0.Add(time.Hour))})
	fed, plain := []string{"unix:uid:1"}, []string{"unix:uid:2"}

	apply := func(bs ...*signerpb.Bundle) []fedChange {
		t.Helper()
		good, refused := federatedFrom(bs, spiffeid.RequireTrustDomainFromString("example.org"), hclog.NewNullLogger())
		return c.setFederated(good, refused)
	}
	// served checks what each caller is given of other.org: its CAs' DER
	// (nil: nothing) and whether its JWT key validates.
	served := func(t *testing.T, sel []string, wantDER []byte, wantJWT bool) {
		t.Helper()
		svids, _ := c.X509SVIDResponse(sel)
		if got := svids.GetFederatedBundles()[otherTD.IDString()]; !bytes.Equal(got, wantDER) {
			t.Errorf("X.509-SVID federated_bundles[other.org] = %d bytes, want %d", len(got), len(wantDER))
		}
		bundles, _ := c.X509BundlesFor(sel)
		if got := bundles.GetBundles()[otherTD.IDString()]; !bytes.Equal(got, wantDER) {
			t.Errorf("X.509 bundles[other.org] = %d bytes, want %d", len(got), len(wantDER))
		}
		if !bytes.Equal(bundles.GetBundles()["spiffe://example.org"], own.Cert.Raw) {
			t.Error("X.509 bundles lack the own bundle")
		}
		jwtResp, _ := c.JWTBundlesResponse(sel)
		_, hasJWKS := jwtResp.GetBundles()[otherTD.IDString()]
		_, hasKey := c.JWTBundles(sel).Get(otherTD)
		if hasJWKS != wantJWT || hasKey != wantJWT {
			t.Errorf("JWT bundle of other.org served %v, validated against %v; want %v", hasJWKS, hasKey, wantJWT)
		}
		if _, ok := c.JWTBundles(nil).Get(otherTD); ok {
			t.Error("other.org's JWT bundle is in the bundles of a caller not attested")
		}
	}

	if ch := apply(wireFed(t, "other.org", 1, []*testca.CA{ca1}, k1)); len(ch) != 1 || ch[0].dropped {
		t.Fatalf("first bundle: changes %v", ch)
	}
	served(t, fed, ca1.Cert.Raw, true)
	served(t, plain, nil, false)
	ownResp, _ := c.X509BundlesResponse()
	if got, _ := c.X509BundlesFor(plain); got != ownResp {
		t.Error("a caller that federates with nothing is not given the shared own response")
	}

	t.Run("sequence alone", func(t *testing.T) {
		before, woken := c.X509SVIDResponse(fed)
		if ch := apply(wireFed(t, "other.org", 2, []*testca.CA{ca1}, k1)); ch != nil {
			t.Errorf("changes %v, want none", ch)
		}
		select {
		case <-woken:
			t.Error("streams woken by a new sequence with the same authorities")
		default:
		}
		if after, _ := c.X509SVIDResponse(fed); after != before {
			t.Error("response rebuilt without a change")
		}
		if st := c.snapshot(rotator.Schedule{}).Federated; len(st) != 1 || st[0].Sequence != 2 {
			t.Errorf("status = %+v, want other.org at sequence 2", st)
		}
	})
	t.Run("rotation reaches only its callers", func(t *testing.T) {
		fedBefore, woken := c.X509SVIDResponse(fed)
		plainBefore, _ := c.X509SVIDResponse(plain)
		plainBundles, _ := c.X509BundlesFor(plain)
		apply(wireFed(t, "other.org", 3, []*testca.CA{ca1, ca2}, k1))
		select {
		case <-woken:
		default:
			t.Error("streams not woken by a new CA")
		}
		if after, _ := c.X509SVIDResponse(fed); after == fedBefore {
			t.Error("the federating caller's response was not rebuilt")
		}
		if after, _ := c.X509SVIDResponse(plain); after != plainBefore {
			t.Error("another caller's X.509-SVID response was rebuilt: its stream would resend")
		}
		if after, _ := c.X509BundlesFor(plain); after != plainBundles {
			t.Error("another caller's bundles response was rebuilt")
		}
		served(t, fed, append(slices.Clone(ca1.Cert.Raw), ca2.Cert.Raw...), true)
		served(t, plain, nil, false)
	})
	t.Run("refused bundle keeps the last good one", func(t *testing.T) {
		if ch := apply(&signerpb.Bundle{TrustDomain: "other.org", X509Authorities: [][]byte{[]byte("junk")}}); ch != nil {
			t.Errorf("changes %v, want none", ch)
		}
		served(t, fed, append(slices.Clone(ca1.Cert.Raw), ca2.Cert.Raw...), true)
	})
	t.Run("entry stops federating", func(t *testing.T) {
		c.setEntries([]*entry{fedEntry("fed", 2, nil, "unix:uid:1"), fedEntry("plain", 1, nil, "unix:uid:2")})
		c.putSVIDs([]*svid{testSVID(t, "fed", 2, t0, t0.Add(time.Hour))})
		served(t, fed, nil, false)
		c.setEntries([]*entry{fedEntry("fed", 3, []string{"other.org"}, "unix:uid:1"), fedEntry("plain", 1, nil, "unix:uid:2")})
		c.putSVIDs([]*svid{testSVID(t, "fed", 3, t0, t0.Add(time.Hour))})
		served(t, fed, append(slices.Clone(ca1.Cert.Raw), ca2.Cert.Raw...), true)
	})
	t.Run("domain no longer sent", func(t *testing.T) {
		if ch := apply(); len(ch) != 1 || !ch[0].dropped {
			t.Errorf("changes %v, want other.org dropped", ch)
		}
		served(t, fed, nil, false)
		if st := c.snapshot(rotator.Schedule{}).Federated; len(st) != 0 {
			t.Errorf("status still lists %+v", st)
		}
	})
}

// TestEntriesFromFederatesWith: an entry's federates_with becomes trust
// domains, sorted and without duplicates; a name that is no trust domain
// or is the agent's own is left out with a warning, and the entry itself
// is still served.
func TestEntriesFromFederatesWith(t *testing.T) {
	var logs testlog.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &logs})
	in := wireEntry("web", 1, "unix:uid:1")
	in.FederatesWith = []string{"third.org", "other.org", "example.org", "Bad Name", "other.org"}
	got := entriesFrom([]*signerpb.Entry{in}, spiffeid.RequireTrustDomainFromString("example.org"), log)
	if len(got) != 1 {
		t.Fatalf("%d entries, want the one", len(got))
	}
	var names []string
	for _, td := range got[0].FederatesWith {
		names = append(names, td.Name())
	}
	if want := []string{"other.org", "third.org"}; !slices.Equal(names, want) {
		t.Errorf("FederatesWith = %v, want %v", names, want)
	}
	for _, want := range []string{`trust_domain=example.org`, `trust_domain="Bad Name"`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %s:\n%s", want, logs.String())
		}
	}
}

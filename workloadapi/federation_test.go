package workloadapi

import (
	"context"
	"crypto/x509"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SPIFFE federation at the socket: which foreign trust domains a caller
// trusts is policy (its entries' federates_with), so the bundle methods
// attest the caller and serve what the Source gives for its selectors;
// ValidateJWTSVID attests it only for a token of a foreign domain.

var otherTD = spiffeid.RequireTrustDomainFromString("other.org")

// otherIssuer mints JWT-SVIDs of other.org.
func otherIssuer(t *testing.T) (*jwtIssuer, *jwtbundle.Bundle) {
	t.Helper()
	iss := newJWTIssuer(t, "other-k1")
	b := jwtbundle.New(otherTD)
	if err := b.AddJWTAuthority(iss.kid, iss.key.Public()); err != nil {
		t.Fatal(err)
	}
	iss.bundle = b
	return iss, b
}

func otherClaims(aud string) map[string]any {
	return with(jwtClaims(time.Now(), "", aud), "sub", "spiffe://other.org/client")
}

// TestFetchX509BundlesPerCaller: the caller is given the bundles the
// Source holds for its selectors, other.org's included when its entries
// federate with it, and not otherwise; a caller that cannot be attested
// is refused like any other call.
func TestFetchX509BundlesPerCaller(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	withOther := ca.bundlesResponse()
	withOther.Bundles[otherTD.IDString()] = other.Cert.Raw
	tests := []struct {
		name     string
		attestor Attestor
		selector string // whose bundles include other.org's
		wantTDs  int
		wantCode codes.Code
	}{
		{name: "caller federates", attestor: unixOnly, selector: uidSelector(), wantTDs: 2},
		{name: "caller does not", attestor: unixOnly, selector: "unix:uid:4242424", wantTDs: 1},
		{name: "caller not attested", attestor: failingAttestor{}, selector: uidSelector(), wantCode: codes.Unavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource(ca.bundlesResponse())
			src.setFederated(tc.selector, withOther)
			srv := startServer(t, tc.attestor, src)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			set, err := newClient(t, srv.path).FetchX509Bundles(ctx)
			if status.Code(err) != tc.wantCode {
				t.Fatalf("FetchX509Bundles = %v, want %v", err, tc.wantCode)
			}
			if err != nil {
				return
			}
			if set.Len() != tc.wantTDs {
				t.Fatalf("%d trust domains served, want %d", set.Len(), tc.wantTDs)
			}
			if b, ok := set.Get(otherTD); ok && !b.X509Authorities()[0].Equal(other.Cert) {
				t.Error("other.org's bundle is not the Source's")
			}
		})
	}
}

// TestFederatedBundleChangePushed: a new bundle for the caller's
// federated domain reaches its open FetchX509Bundles stream.
func TestFederatedBundleChangePushed(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	srv := startServer(t, unixOnly, src)
	client := rawClient(t, srv.path)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := client.FetchX509Bundles(withHeader(ctx), &workload.X509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || len(first.GetBundles()) != 1 {
		t.Fatalf("first response: %d bundles (%v), want the own one", len(first.GetBundles()), err)
	}
	withOther := &workload.X509BundlesResponse{Bundles: maps.Clone(first.GetBundles())}
	withOther.Bundles[otherTD.IDString()] = other.Cert.Raw
	src.setFederated(uidSelector(), withOther)
	next, err := stream.Recv()
	if err != nil || len(next.GetBundles()[otherTD.IDString()]) == 0 {
		t.Fatalf("pushed response lacks other.org (%v)", err)
	}
}

// TestFetchJWTBundlesPerCaller: like the X.509 bundles, a caller whose
// entries federate with other.org is given its JWKS, another is not.
func TestFetchJWTBundlesPerCaller(t *testing.T) {
	own := newJWTIssuer(t, "k1")
	other, otherBundle := otherIssuer(t)
	jwks, err := otherBundle.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		selector string
		want     bool
	}{
		{"caller federates", uidSelector(), true},
		{"caller does not", "unix:uid:4242424", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeJWTSource(t, own)
			resp := &workload.JWTBundlesResponse{Bundles: maps.Clone(own.bundlesResponse(t).GetBundles())}
			resp.Bundles[otherTD.IDString()] = jwks
			src.federate(tc.selector, resp, jwtbundle.NewSet(own.bundle, otherBundle))
			srv := startJWTServer(t, unixOnly, src)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			set, err := newClient(t, srv.path).FetchJWTBundles(ctx)
			if err != nil {
				t.Fatal(err)
			}
			b, ok := set.Get(otherTD)
			if got := ok && b.HasJWTAuthority(other.kid); got != tc.want {
				t.Errorf("other.org's key served = %v, want %v", got, tc.want)
			}
			if _, ok := set.Get(td); !ok {
				t.Error("own JWT bundle missing")
			}
		})
	}
}

// TestValidateJWTSVIDFederated: a token of other.org validates for a
// caller whose entries federate with it, with every other check as for
// the own domain's tokens; a caller that does not federate, or cannot be
// attested, is refused with the reason. Tokens of the own domain still
// need no attestation.
func TestValidateJWTSVIDFederated(t *testing.T) {
	own := newJWTIssuer(t, "k1")
	other, otherBundle := otherIssuer(t)
	stranger := newECKey(t)
	tests := []struct {
		name     string
		attestor Attestor
		selector string // whose bundles include other.org's
		token    string
		audience string
		wantID   string
		wantMsg  string
	}{
		{name: "federating caller", attestor: unixOnly, selector: uidSelector(),
			token: other.mint(t, otherClaims("a")), audience: "a", wantID: "spiffe://other.org/client"},
		{name: "federating caller, wrong audience", attestor: unixOnly, selector: uidSelector(),
			token: other.mint(t, otherClaims("a")), audience: "b", wantMsg: `audience "b" is not among the token's ["a"]`},
		{name: "federating caller, expired", attestor: unixOnly, selector: uidSelector(),
			token:    other.mint(t, with(otherClaims("a"), "exp", time.Now().Add(-time.Hour).Unix())),
			audience: "a", wantMsg: "token expired at"},
		{name: "federating caller, key not in other.org's bundle", attestor: unixOnly, selector: uidSelector(),
			token: signJWT(t, jose.ES256, stranger, other.kid, otherClaims("a")), audience: "a",
			wantMsg: `signature does not verify with key "other-k1" of trust domain "other.org"`},
		{name: "HMAC refused before any bundle", attestor: unixOnly, selector: uidSelector(),
			token: signJWT(t, jose.HS256, []byte("the public key bytes of other-k1, as a confused verifier would use them"), other.kid, otherClaims("a")), audience: "a",
			wantMsg: `algorithm "HS256" is not allowed`},
		{name: "caller does not federate", attestor: unixOnly, selector: "unix:uid:4242424",
			token: other.mint(t, otherClaims("a")), audience: "a",
			wantMsg: `no JWT bundle for trust domain "other.org" of sub spiffe://other.org/client: no entry of the caller federates with it`},
		{name: "caller not attested", attestor: failingAttestor{}, selector: uidSelector(),
			token: other.mint(t, otherClaims("a")), audience: "a",
			wantMsg: `no JWT bundle for trust domain "other.org" of sub spiffe://other.org/client: a foreign domain's tokens are validated only for a caller whose entries federate with it, and the caller could not be attested`},
		{name: "own token, caller not attested", attestor: failingAttestor{}, selector: uidSelector(),
			token: own.mint(t, jwtClaims(time.Now(), "/web", "a")), audience: "a", wantID: "spiffe://example.org/web"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeJWTSource(t, own)
			src.federate(tc.selector, own.bundlesResponse(t), jwtbundle.NewSet(own.bundle, otherBundle))
			srv := startJWTServer(t, tc.attestor, src)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := rawClient(t, srv.path).ValidateJWTSVID(withHeader(ctx), &workload.ValidateJWTSVIDRequest{Svid: tc.token, Audience: tc.audience})
			if tc.wantMsg != "" {
				if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), tc.wantMsg) {
					t.Fatalf("ValidateJWTSVID = %v, want InvalidArgument %q", err, tc.wantMsg)
				}
				return
			}
			if err != nil {
				t.Fatalf("ValidateJWTSVID: %v", err)
			}
			if resp.GetSpiffeId() != tc.wantID {
				t.Errorf("spiffe_id = %s, want %s", resp.GetSpiffeId(), tc.wantID)
			}
		})
	}
}

// TestSDSFederatedBundlesPerCaller: over SDS too, a foreign trust domain's
// bundle (ALL, its name) reaches only a caller whose entries federate
// with it.
func TestSDSFederatedBundlesPerCaller(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	withOther := ca.bundlesResponse()
	withOther.Bundles[otherTD.IDString()] = other.Cert.Raw
	for _, tc := range []struct {
		name     string
		selector string
		want     []string
	}{
		{"caller federates", uidSelector(), []string{"ALL=spiffe:example.org,other.org", "other.org=ca:other.org"}},
		{"caller does not", "unix:uid:4242424", []string{"ALL=spiffe:example.org"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource(ca.bundlesResponse())
			src.setFederated(tc.selector, withOther)
			srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, SDS: SDSConfig{TrustDomain: td}})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := secretv3.NewSecretDiscoveryServiceClient(sdsConn(t, srv.path)).FetchSecrets(ctx,
				&discoveryv3.DiscoveryRequest{ResourceNames: []string{"ALL", "other.org"}, TypeUrl: secretTypeURL})
			if err != nil {
				t.Fatalf("FetchSecrets: %v", err)
			}
			names, secrets := decodeSecrets(t, resp)
			var got []string
			for _, n := range names {
				got = append(got, n+"="+describeSecret(t, secrets[n], map[string]*x509.Certificate{"example.org": ca.Cert, "other.org": other.Cert}))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("served %q, want %q", got, tc.want)
			}
		})
	}
}

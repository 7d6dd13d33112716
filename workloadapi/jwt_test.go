package workloadapi

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// startJWTServer serves src's JWT-SVIDs to callers with the unix attestor.
func startJWTServer(t *testing.T, att Attestor, src JWTSource) *running {
	t.Helper()
	return startServerWith(t, Config{
		SocketPath: filepath.Join(socketDir(t), "w.sock"),
		Attestor:   att,
		Source:     newFakeSource(nil),
		JWT:        src,
	})
}

// rawClient talks to the server with only the metadata the test gives.
func rawClient(t *testing.T, path string) workload.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return workload.NewSpiffeWorkloadAPIClient(conn)
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, securityHeader, "true")
}

func TestFetchJWTSVID(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	web, db := "spiffe://example.org/web", "spiffe://example.org/db"
	tests := []struct {
		name     string
		attestor Attestor
		entitle  []string // SPIFFE IDs for this process's uid
		err      error    // from the source
		req      *workload.JWTSVIDRequest
		wantIDs  []string
		wantCode codes.Code
		wantMsg  string
		wantLog  string
	}{
		{name: "every entitled identity", attestor: unixOnly, entitle: []string{web, db},
			req: &workload.JWTSVIDRequest{Audience: []string{"a", "b"}}, wantIDs: []string{web, db},
			wantLog: `"spiffe_ids":["spiffe://example.org/web","spiffe://example.org/db"]`},
		{name: "the one named", attestor: unixOnly, entitle: []string{web, db},
			req: &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: db}, wantIDs: []string{db},
			wantLog: `"@message":"served JWT-SVIDs"`},
		{name: "named identity not entitled", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: db},
			wantCode: codes.PermissionDenied, wantMsg: "no identity issued for spiffe://example.org/db",
			wantLog: `"requested_spiffe_id":"spiffe://example.org/db"`},
		{name: "caller entitled to nothing", attestor: unixOnly,
			req:      &workload.JWTSVIDRequest{Audience: []string{"a"}},
			wantCode: codes.PermissionDenied, wantMsg: "no identity issued", wantLog: `"@message":"no identity issued"`},
		{name: "missing audience", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{},
			wantCode: codes.InvalidArgument, wantMsg: "audience is required"},
		{name: "empty audience value", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"a", ""}},
			wantCode: codes.InvalidArgument, wantMsg: "audience 1: empty audience value"},
		{name: "NUL in audience", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"p\x00q"}},
			wantCode: codes.InvalidArgument, wantMsg: "audience 0: audience value holds control character U+0000 at byte 1"},
		{name: "newline in audience", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"a", "b\nc"}},
			wantCode: codes.InvalidArgument, wantMsg: "audience 1: audience value holds control character U+000A at byte 1"},
		{name: "C1 control in audience", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"a\u0085"}},
			wantCode: codes.InvalidArgument, wantMsg: "audience 0: audience value holds control character U+0085 at byte 1"},
		{name: "oversized audience", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{strings.Repeat("a", 1025)}},
			wantCode: codes.InvalidArgument, wantMsg: "audience 0: audience value of 1025 bytes (limit 1024)"},
		{name: "too many audiences", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: slices.Repeat([]string{"a"}, 33)},
			wantCode: codes.InvalidArgument, wantMsg: "too many audience values: 33 (limit 32)"},
		{name: "spiffe_id not a SPIFFE ID", attestor: unixOnly, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: "https://example.org/web"},
			wantCode: codes.InvalidArgument, wantMsg: `spiffe_id "https://example.org/web" is not a SPIFFE ID: scheme is missing or invalid`},
		{name: "signer unreachable", attestor: unixOnly, entitle: []string{web}, err: errors.New("signer unreachable"),
			req:      &workload.JWTSVIDRequest{Audience: []string{"a"}},
			wantCode: codes.Unavailable, wantMsg: "could not mint JWT-SVID: signer unreachable",
			wantLog: `"@message":"could not mint JWT-SVIDs"`},
		{name: "attestation fails", attestor: failingAttestor{}, entitle: []string{web},
			req:      &workload.JWTSVIDRequest{Audience: []string{"a"}},
			wantCode: codes.Unavailable, wantMsg: "could not attest caller"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeJWTSource(t, iss)
			src.err = tc.err
			src.entitle(uidSelector(), tc.entitle...)
			srv := startJWTServer(t, tc.attestor, src)

			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := rawClient(t, srv.path).FetchJWTSVID(withHeader(ctx), tc.req)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("status code = %v (%v), want %v", got, err, tc.wantCode)
			}
			if got := status.Convert(err).Message(); tc.wantCode != codes.OK && got != tc.wantMsg {
				t.Errorf("message = %q, want %q", got, tc.wantMsg)
			}
			var ids []string
			for _, s := range resp.GetSvids() {
				ids = append(ids, s.GetSpiffeId())
				svid, err := jwtsvid.ParseAndValidate(s.GetSvid(), iss.set(), tc.req.GetAudience())
				if err != nil {
					t.Errorf("served token does not validate: %v", err)
				} else if svid.ID.String() != s.GetSpiffeId() {
					t.Errorf("token sub = %s, response says %s", svid.ID, s.GetSpiffeId())
				}
			}
			if !slices.Equal(ids, tc.wantIDs) {
				t.Errorf("SPIFFE IDs = %v, want %v", ids, tc.wantIDs)
			}
			if tc.wantLog == "" {
				return
			}
			logs := srv.logs.waitFor(t, tc.wantLog)
			for _, want := range []string{`"pid":` + strconv.Itoa(os.Getpid()), `"audience":["a"`} {
				if !strings.Contains(logs, want) {
					t.Errorf("logs lack %s:\n%s", want, logs)
				}
			}
			for _, s := range resp.GetSvids() {
				if strings.Contains(logs, s.GetSvid()) || strings.Contains(logs, "eyJ") {
					t.Fatalf("logs hold a token:\n%s", logs)
				}
			}
		})
	}
}

// TestFetchJWTSVIDGoSpiffe is the path every go-spiffe workload takes.
func TestFetchJWTSVIDGoSpiffe(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	src := newFakeJWTSource(t, iss)
	src.entitle(uidSelector(), "spiffe://example.org/web")
	srv := startJWTServer(t, unixOnly, src)
	client := newClient(t, srv.path)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", ExtraAudiences: []string{"b"}})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if svid.ID.String() != "spiffe://example.org/web" || !slices.Equal(svid.Audience, []string{"a", "b"}) {
		t.Errorf("SVID = %s for %v, want spiffe://example.org/web for [a b]", svid.ID, svid.Audience)
	}
	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{"b"}); err != nil {
		t.Errorf("token does not validate against the served bundles: %v", err)
	}
	got, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "b")
	if err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if got.ID != svid.ID {
		t.Errorf("validated ID = %s, want %s", got.ID, svid.ID)
	}
}

func TestValidateJWTSVID(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	other := newECKey(t)
	src := newFakeJWTSource(t, iss)
	srv := startJWTServer(t, unixOnly, src)
	client := rawClient(t, srv.path)

	now := time.Now()
	good := jwtClaims(now, "/web", "a", "b")
	good["extra"] = "kept"
	valid := iss.mint(t, good)
	tests := []struct {
		name     string
		token    string
		audience string
		wantMsg  string // empty: accepted
	}{
		{name: "valid", token: valid, audience: "b"},
		{name: "expired within leeway", token: iss.mint(t, with(good, "exp", now.Add(-10*time.Second).Unix())), audience: "a"},
		{name: "tampered signature", token: tamperSignature(t, valid), audience: "a",
			wantMsg: `signature does not verify with key "k1" of trust domain "example.org"`},
		{name: "tampered payload", token: replacePayload(t, valid, with(good, "sub", "spiffe://example.org/admin")), audience: "a",
			wantMsg: `signature does not verify with key "k1" of trust domain "example.org"`},
		{name: "alg none", token: unsignedJWT(t, "k1", good), audience: "a",
			wantMsg: `algorithm "none" is not allowed: the token is unsigned`},
		{name: "HS256 signed with the public key", token: signJWT(t, jose.HS256, publicKeyBytes(t, iss.key), "k1", good), audience: "a",
			wantMsg: `algorithm "HS256" is not allowed: HMAC tokens are never accepted`},
		{name: "unknown kid", token: signJWT(t, jose.ES256, other, "k2", good), audience: "a",
			wantMsg: `unknown kid "k2": not in the JWT bundle of trust domain "example.org"`},
		{name: "known kid, other key", token: signJWT(t, jose.ES256, other, "k1", good), audience: "a",
			wantMsg: `signature does not verify with key "k1"`},
		{name: "no kid", token: signJWT(t, jose.ES256, iss.key, "", good), audience: "a",
			wantMsg: "token header has no kid"},
		{name: "expired", token: iss.mint(t, with(good, "exp", now.Add(-2*time.Minute).Unix())), audience: "a",
			wantMsg: "token expired at " + now.Add(-2*time.Minute).UTC().Format(time.RFC3339) + " (leeway 30s)"},
		{name: "not yet valid nbf", token: iss.mint(t, with(good, "nbf", now.Add(5*time.Minute).Unix())), audience: "a",
			wantMsg: "token not valid yet: nbf is " + now.Add(5*time.Minute).UTC().Format(time.RFC3339)},
		{name: "not yet valid iat", token: iss.mint(t, with(good, "iat", now.Add(5*time.Minute).Unix())), audience: "a",
			wantMsg: "token not valid yet: iat is in the future"},
		{name: "no exp", token: iss.mint(t, with(good, "exp", nil)), audience: "a",
			wantMsg: "token has no exp claim"},
		{name: "wrong audience", token: valid, audience: "c",
			wantMsg: `audience "c" is not among the token's ["a" "b"]`},
		{name: "foreign trust domain", token: iss.mint(t, with(good, "sub", "spiffe://evil.org/web")), audience: "a",
			wantMsg: `no JWT bundle for trust domain "evil.org" of sub spiffe://evil.org/web`},
		{name: "sub not a SPIFFE ID", token: iss.mint(t, with(good, "sub", "web")), audience: "a",
			wantMsg: `sub "web" is not a SPIFFE ID`},
		{name: "garbage", token: "this is not a token", audience: "a",
			wantMsg: "malformed token: not a JWS in compact serialization (three dot-separated parts)"},
		{name: "garbage in three parts", token: "a.b.c", audience: "a",
			wantMsg: "malformed token header"},
		{name: "empty token", token: "", audience: "a", wantMsg: "svid is required"},
		{name: "missing audience", token: valid, audience: "", wantMsg: "audience is required"},
		{name: "NUL in audience", token: valid, audience: "a\x00", wantMsg: "audience: audience value holds control character U+0000 at byte 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := client.ValidateJWTSVID(withHeader(ctx), &workload.ValidateJWTSVIDRequest{Svid: tc.token, Audience: tc.audience})
			if tc.wantMsg != "" {
				if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), tc.wantMsg) {
					t.Fatalf("ValidateJWTSVID = %v, want InvalidArgument %q", err, tc.wantMsg)
				}
				return
			}
			if err != nil {
				t.Fatalf("ValidateJWTSVID: %v", err)
			}
			if resp.GetSpiffeId() != "spiffe://example.org/web" {
				t.Errorf("spiffe_id = %q", resp.GetSpiffeId())
			}
			claims := resp.GetClaims().AsMap()
			if claims["sub"] != "spiffe://example.org/web" || claims["extra"] != "kept" {
				t.Errorf("claims = %v, want sub and extra", claims)
			}
		})
	}
	if logs := srv.logs.String(); strings.Contains(logs, valid) {
		t.Errorf("logs hold a token:\n%s", logs)
	}
}

// TestValidateJWTSVIDWithIssuer: a JWT-SVID of a signer with
// oidc_discovery carries iss; ValidateJWTSVID accepts it (the JWT-SVID
// spec neither needs nor forbids iss) and hands it back with the claims.
func TestValidateJWTSVIDWithIssuer(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	srv := startJWTServer(t, unixOnly, newFakeJWTSource(t, iss))
	client := rawClient(t, srv.path)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	token := iss.mint(t, with(jwtClaims(time.Now(), "/web", "sts.amazonaws.com"), "iss", "https://oidc.example.org"))
	resp, err := client.ValidateJWTSVID(withHeader(ctx), &workload.ValidateJWTSVIDRequest{Svid: token, Audience: "sts.amazonaws.com"})
	if err != nil {
		t.Fatalf("ValidateJWTSVID refuses a token with iss: %v", err)
	}
	if got := resp.GetClaims().AsMap()["iss"]; got != "https://oidc.example.org" {
		t.Errorf("iss claim = %v, want https://oidc.example.org", got)
	}
}

// TestValidateJWTSVIDLeeway pins where the leeway ends, on each side.
func TestValidateJWTSVIDLeeway(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	now := time.Unix(1_800_000_000, 0)
	base := jwtClaims(now.Add(-time.Minute), "/web", "a")
	tests := []struct {
		name   string
		claims map[string]any
		ok     bool
	}{
		{name: "exp 29s ago", claims: with(base, "exp", now.Add(-29*time.Second).Unix()), ok: true},
		{name: "exp 31s ago", claims: with(base, "exp", now.Add(-31*time.Second).Unix())},
		{name: "nbf in 29s", claims: with(base, "nbf", now.Add(29*time.Second).Unix()), ok: true},
		{name: "nbf in 31s", claims: with(base, "nbf", now.Add(31*time.Second).Unix())},
		{name: "iat in 29s", claims: with(base, "iat", now.Add(29*time.Second).Unix()), ok: true},
		{name: "iat in 31s", claims: with(base, "iat", now.Add(31*time.Second).Unix())},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := validateJWTSVID(iss.mint(t, tc.claims), "a", fromSet(iss.set()), now)
			if (err == nil) != tc.ok {
				t.Errorf("validateJWTSVID = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

// TestValidateJWTSVIDAlgorithms: every allowed algorithm validates with a
// bundle key of its kind, and a key of another kind never does.
func TestValidateJWTSVIDAlgorithms(t *testing.T) {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	iss := newJWTIssuer(t, "ec256")
	for kid, k := range map[string]crypto.PublicKey{"ec384": p384.Public(), "rsa": rsaKey.Public()} {
		if err := iss.bundle.AddJWTAuthority(kid, k); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	claims := jwtClaims(now, "/web", "a")
	tests := []struct {
		name    string
		alg     jose.SignatureAlgorithm
		key     any
		kid     string
		wantErr string // empty: accepted
	}{
		{name: "ES256", alg: jose.ES256, key: iss.key, kid: "ec256"},
		{name: "ES384", alg: jose.ES384, key: p384, kid: "ec384"},
		{name: "RS256", alg: jose.RS256, key: rsaKey, kid: "rsa"},
		{name: "PS512", alg: jose.PS512, key: rsaKey, kid: "rsa"},
		{name: "ES384 under a P-256 kid", alg: jose.ES384, key: p384, kid: "ec256", wantErr: `signature does not verify with key "ec256"`},
		{name: "RS256 under an EC kid", alg: jose.RS256, key: rsaKey, kid: "ec256", wantErr: `signature does not verify with key "ec256"`},
		{name: "ES256 under the RSA kid", alg: jose.ES256, key: iss.key, kid: "rsa", wantErr: `signature does not verify with key "rsa"`},
		{name: "HS512", alg: jose.HS512, key: make([]byte, 64), kid: "rsa", wantErr: `algorithm "HS512" is not allowed`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, _, err := validateJWTSVID(signJWT(t, tc.alg, tc.key, tc.kid, claims), "a", fromSet(iss.set()), now)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("validateJWTSVID: %v", err)
			case tc.wantErr == "" && id.String() != "spiffe://example.org/web":
				t.Errorf("ID = %s", id)
			case tc.wantErr != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.wantErr)):
				t.Errorf("validateJWTSVID = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// TestJWTSecurityHeader: the JWT methods need the header like the others.
func TestJWTSecurityHeader(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	src := newFakeJWTSource(t, iss)
	src.entitle(uidSelector(), "spiffe://example.org/web")
	client := rawClient(t, startJWTServer(t, unixOnly, src).path)
	calls := []struct {
		name string
		call func(context.Context) error
	}{
		{name: "FetchJWTSVID", call: func(ctx context.Context) error {
			_, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}})
			return err
		}},
		{name: "FetchJWTBundles", call: func(ctx context.Context) error {
			s, err := client.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}},
		{name: "ValidateJWTSVID", call: func(ctx context.Context) error {
			_, err := client.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: "x.y.z"})
			return err
		}},
	}
	for _, tc := range calls {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := tc.call(ctx)
			if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != "security header missing from request" {
				t.Errorf("%s without header = %v, want InvalidArgument security header missing", tc.name, err)
			}
		})
	}
}

// TestValidateJWTSVIDNeedsNoIdentity: a caller entitled to nothing, or
// that cannot even be attested, may still validate.
func TestValidateJWTSVIDNeedsNoIdentity(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	srv := startJWTServer(t, failingAttestor{}, newFakeJWTSource(t, iss))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := newClient(t, srv.path).ValidateJWTSVID(ctx, iss.mint(t, jwtClaims(time.Now(), "/web", "a")), "a")
	if err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if want := spiffeid.RequireFromString("spiffe://example.org/web"); got.ID != want {
		t.Errorf("ID = %s, want %s", got.ID, want)
	}
}

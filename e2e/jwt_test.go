package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// jwtPolicy gives this test process JWT-SVIDs for each name, with jwtTTL.
func jwtPolicy(tpm *swtpmtest.TPM, jwtTTL string, names ...string) string {
	return selfPolicy(tpm, "30s", jwtTTL, names...)
}

// tokenHeader decodes a token's JOSE header, which is not secret.
func tokenHeader(t *testing.T, token string) (alg, kid string) {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(strings.SplitN(token, ".", 2)[0])
	if err != nil {
		t.Fatalf("token header: %v", err)
	}
	var h struct{ Alg, Kid string }
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatalf("token header: %v", err)
	}
	return h.Alg, h.Kid
}

func TestAgentServesJWTSVIDs(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, jwtPolicy(tpm, "2m", "web", "db"))
	e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 60*time.Second)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", ExtraAudiences: []string{"b"}, Subject: web})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	token := svid.Marshal()

	t.Run("ValidateJWTSVID accepts it", func(t *testing.T) {
		got, err := client.ValidateJWTSVID(ctx, token, "b")
		if err != nil {
			t.Fatalf("ValidateJWTSVID: %v", err)
		}
		if got.ID != web {
			t.Errorf("validated ID = %s, want %s", got.ID, web)
		}
	})
	t.Run("ParseAndValidate against FetchJWTBundles accepts it", func(t *testing.T) {
		bundles, err := client.FetchJWTBundles(ctx)
		if err != nil {
			t.Fatalf("FetchJWTBundles: %v", err)
		}
		got, err := jwtsvid.ParseAndValidate(token, bundles, []string{"a"})
		if err != nil {
			t.Fatalf("ParseAndValidate: %v", err)
		}
		if got.ID != web {
			t.Errorf("ID = %s, want %s", got.ID, web)
		}
		if alg, kid := tokenHeader(t, token); alg != "ES256" || kid == "" {
			t.Errorf("header alg=%q kid=%q, want ES256 and a kid", alg, kid)
		}
	})
	t.Run("lifetime is the entry's jwt_ttl", func(t *testing.T) {
		iat, ok := svid.Claims["iat"].(float64)
		if !ok {
			t.Fatalf("no iat claim: %v", svid.Claims)
		}
		if got := svid.Expiry.Sub(time.Unix(int64(iat), 0)); got != 2*time.Minute {
			t.Errorf("exp - iat = %v, want jwt_ttl 2m", got)
		}
	})
	t.Run("JWT bundle is a JWKS with use jwt-svid", func(t *testing.T) {
		conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchJWTBundles(
			metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), &workload.JWTBundlesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		var jwks struct {
			Keys []struct {
				Use string `json:"use"`
				Kid string `json:"kid"`
			} `json:"keys"`
		}
		// The spec keys bundles by the trust domain's SPIFFE ID.
		raw, ok := resp.GetBundles()[td.IDString()]
		if !ok || len(resp.GetBundles()) != 1 {
			t.Fatalf("JWT bundles keyed %v, want one for %s", slices.Collect(maps.Keys(resp.GetBundles())), td.IDString())
		}
		if err := json.Unmarshal(raw, &jwks); err != nil {
			t.Fatalf("JWT bundle of %s: %v", td, err)
		}
		if len(jwks.Keys) == 0 {
			t.Fatal("JWT bundle has no keys")
		}
		for _, k := range jwks.Keys {
			if k.Use != "jwt-svid" {
				t.Errorf("key %q has use %q, want jwt-svid", k.Kid, k.Use)
			}
		}
	})
	t.Run("tampered token is refused with the reason", func(t *testing.T) {
		parts := strings.Split(token, ".")
		forged := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"sub":"spiffe://example.org/db","aud":["a"],"exp":9999999999}`)) + "." + parts[2]
		_, err := client.ValidateJWTSVID(ctx, forged, "a")
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "signature does not verify") {
			t.Errorf("forged token: %v, want InvalidArgument signature does not verify", err)
		}
	})
	t.Run("unentitled spiffe_id is PermissionDenied", func(t *testing.T) {
		_, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", Subject: spiffeid.RequireFromString("spiffe://example.org/nobody")})
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("FetchJWTSVID for another ID: %v, want PermissionDenied", err)
		}
	})
	t.Run("missing audience is InvalidArgument", func(t *testing.T) {
		_, err := client.FetchJWTSVID(ctx, jwtsvid.Params{})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("FetchJWTSVID without audience: %v, want InvalidArgument", err)
		}
	})
	t.Run("CLI fetch jwt and validate jwt", func(t *testing.T) {
		testJWTCLI(t, e.socket)
	})
	if out := agent.out.String(); strings.Contains(out, token) || strings.Contains(out, "eyJ") {
		t.Errorf("agent logs hold a token:\n%s", out)
	}
}

// runAgentCmd runs lanyard-agent with args and stdin, and returns its
// stdout, stderr and exit code.
func runAgentCmd(t *testing.T, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "lanyard-agent"), args...)
	var out, errOut bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(stdin), &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run lanyard-agent %v: %v", args, err)
	}
	return out.String(), errOut.String(), code
}

func testJWTCLI(t *testing.T, socket string) {
	out, errOut, code := runAgentCmd(t, "", "fetch", "jwt", "--audience", "a", "--spiffe-id", "spiffe://example.org/web", "--socket", socket)
	if code != 0 {
		t.Fatalf("fetch jwt: exit %d\n%s", code, errOut)
	}
	for _, want := range []string{"SPIFFE ID:  spiffe://example.org/web\n", "  audience:   a\n", "  expires:    ", "  token:      eyJ"} {
		if !strings.Contains(out, want) {
			t.Errorf("fetch jwt output lacks %q:\n%s", want, out)
		}
	}
	out, errOut, code = runAgentCmd(t, "", "fetch", "jwt", "--audience", "a", "--token-only", "--socket", socket)
	tokens := strings.Fields(out)
	if code != 0 || len(tokens) != 2 {
		t.Fatalf("fetch jwt --token-only: exit %d, %d tokens, want 2 (web and db)\n%s", code, len(tokens), errOut)
	}

	tests := []struct {
		name     string
		stdin    string
		args     []string
		wantCode int
		wantOut  string // in stdout
		wantErr  string // in stderr
	}{
		{name: "valid token on stdin", stdin: tokens[0] + "\n", args: []string{"--audience", "a", "-"},
			wantOut: "SPIFFE ID:  spiffe://example.org/web"},
		{name: "valid token as argument", args: []string{"--audience", "a", tokens[1]},
			wantOut: `"sub": "spiffe://example.org/db"`},
		{name: "wrong audience", args: []string{"--audience", "c", tokens[0]}, wantCode: 1,
			wantErr: `token refused: InvalidArgument: audience "c" is not among the token's ["a"]`},
		{name: "garbage", args: []string{"--audience", "a", "garbage"}, wantCode: 1,
			wantErr: "token refused: InvalidArgument: malformed token"},
		{name: "no audience", args: []string{tokens[0]}, wantCode: 2, wantErr: "usage: lanyard-agent validate jwt"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"validate", "jwt", "--socket", socket}, tc.args...)
			out, errOut, code := runAgentCmd(t, tc.stdin, args...)
			if code != tc.wantCode || !strings.Contains(out, tc.wantOut) || !strings.Contains(errOut, tc.wantErr) {
				t.Errorf("validate jwt: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.wantCode, out, errOut)
			}
			if strings.Contains(out+errOut, tokens[0]) {
				t.Errorf("validate jwt printed the token")
			}
		})
	}
	if _, errOut, code := runAgentCmd(t, "", "fetch", "jwt", "--socket", socket); code != 2 || !strings.Contains(errOut, "usage: lanyard-agent fetch jwt --audience A") {
		t.Errorf("fetch jwt without --audience: exit %d, want 2 and usage\n%s", code, errOut)
	}
}

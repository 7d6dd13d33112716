package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// TestOIDCDiscovery runs the real signer with an oidc_discovery block:
// its discovery document and JWKS are served over HTTP, and a relying
// party that knows nothing but the issuer URL (go-oidc) verifies a token
// fetched through the real agent.
func TestOIDCDiscovery(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, jwtPolicy(tpm, "2m", "web"))
	addr := freePort(t)
	issuer := "http://" + addr
	cfg, err := os.ReadFile(e.signerCfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.signerCfg, string(cfg)+"oidc_discovery {\n  listen_address = \""+addr+"\"\n  issuer         = \""+issuer+"\"\n}\n")
	signer := e.startSigner(t)
	signer.waitLog(t, 10*time.Second, "oidc discovery serving")

	client := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	get := func(url string) (*http.Response, []byte) {
		t.Helper()
		resp, err := client.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s %v", url, resp.Status, err)
		}
		return resp, body
	}
	_, body := get(issuer + "/.well-known/openid-configuration")
	var doc struct {
		Issuer  string   `json:"issuer"`
		JWKSURI string   `json:"jwks_uri"`
		Algs    []string `json:"id_token_signing_alg_values_supported"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		t.Fatalf("discovery document: %v\n%s", err, body)
	}
	if doc.Issuer != issuer || doc.JWKSURI != issuer+"/keys" || len(doc.Algs) != 1 || doc.Algs[0] != "ES256" {
		t.Errorf("discovery document = %+v", doc)
	}
	resp, body := get(doc.JWKSURI)
	var jwks struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(body, &jwks); err != nil || len(jwks.Keys) == 0 {
		t.Fatalf("JWKS: %v\n%s", err, body)
	}
	for _, k := range jwks.Keys {
		if k["use"] != "sig" || k["alg"] != "ES256" || k["d"] != nil {
			t.Errorf("JWKS key %v: use %v alg %v, want a public sig ES256 key", k["kid"], k["use"], k["alg"])
		}
	}
	if resp.Header.Get("ETag") == "" || !strings.HasPrefix(resp.Header.Get("Cache-Control"), "public, max-age=") {
		t.Errorf("JWKS headers ETag %q Cache-Control %q", resp.Header.Get("ETag"), resp.Header.Get("Cache-Control"))
	}

	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")
	out, errOut, code := runAgentCmd(t, "", "fetch", "jwt", "--audience", "sts.amazonaws.com", "--token-only", "--socket", e.socket)
	token := strings.TrimSpace(out)
	if code != 0 || strings.Count(token, ".") != 2 {
		t.Fatalf("fetch jwt: exit %d\n%s", code, errOut)
	}
	ctx := oidc.ClientContext(ctxFor(t, 30*time.Second), client)
	provider, err := oidc.NewProvider(ctx, issuer)
	if err != nil {
		t.Fatalf("oidc.NewProvider: %v", err)
	}
	verifier := provider.Verifier(&oidc.Config{ClientID: "sts.amazonaws.com", SupportedSigningAlgs: []string{oidc.ES256}})
	tok, err := verifier.Verify(ctx, token)
	if err != nil {
		t.Fatalf("go-oidc refuses the agent's JWT-SVID: %v", err)
	}
	if tok.Subject != "spiffe://example.org/web" || tok.Issuer != issuer {
		t.Errorf("sub %s iss %s, want spiffe://example.org/web and %s", tok.Subject, tok.Issuer, issuer)
	}
	if _, err := provider.Verifier(&oidc.Config{ClientID: "vault", SupportedSigningAlgs: []string{oidc.ES256}}).Verify(ctx, token); err == nil {
		t.Error("go-oidc accepts the token for another audience")
	}
	if strings.Contains(signer.out.String(), token) || strings.Contains(agent.out.String(), token) {
		t.Error("a log holds the token")
	}
}

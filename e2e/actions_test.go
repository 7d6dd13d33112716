package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// actionTTL is both the action ttl and the signer's jwt_max_ttl (its
// minimum), so that a revocation expires within the test.
const actionTTL = 10 * time.Second

// actionsPolicy: both TPMs are nodes; "bot" (this test's uid) may take
// action identities tool/<any one segment> and github.read.
func actionsPolicy(tpm *swtpmtest.TPM, uid int) string {
	return fmt.Sprintf(`node "lab" {
  ek_ca = [%q]
}
workload "bot" {
  spiffe_id = "spiffe://example.org/bot"
  nodes     = ["lab"]
  selectors = ["unix:uid:%d"]
  jwt_ttl   = "10s"
  actions {
    ttl   = "10s"
    names = ["tool/*", "github.read"]
  }
}
`, tpm.EKCAPath, uid)
}

// tokenClaims reads an action token's claims (not secret; the token is
// never printed).
type tokenClaims struct {
	jwt.Claims
	Act struct {
		Sub string `json:"sub"`
	} `json:"act"`
}

func readTokenClaims(t *testing.T, token string) tokenClaims {
	t.Helper()
	p, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256})
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	var c tokenClaims
	if err := p.UnsafeClaimsWithoutVerification(&c); err != nil {
		t.Fatalf("token claims: %v", err)
	}
	return c
}

// TestActionIdentities plays an AI agent with go-spiffe's client: one
// fresh token per action, each validated once and only once, none served
// to another process; a revocation reaches a second agent of the same
// signer within a second, and is dropped once expired.
func TestActionIdentities(t *testing.T) {
	t.Parallel()
	tpm, tpm2 := swtpmtest.Start(t), swtpmtest.Start(t)
	e := newEnv(t, tpm, actionsPolicy(tpm, os.Getuid()))
	appendFile(t, e.signerCfg, fmt.Sprintf("jwt_max_ttl = %q\n", actionTTL))
	// Both swtpms' EKs chain to the one test EK CA, so the node block
	// admits the second agent too.
	if a, b := readOrFail(t, tpm.EKCAPath), readOrFail(t, tpm2.EKCAPath); a != b {
		writeFile(t, e.policyPath, strings.Replace(actionsPolicy(tpm, os.Getuid()), fmt.Sprintf("[%q]", tpm.EKCAPath),
			fmt.Sprintf("[%q, %q]", tpm.EKCAPath, tpm2.EKCAPath), 1))
	}
	e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")
	socket2, admin2 := filepath.Join(e.dir, "w2.sock"), filepath.Join(e.dir, "admin2", "a.sock")
	cfg2 := filepath.Join(e.dir, "agent2.hcl")
	writeFile(t, cfg2, fmt.Sprintf(`trust_domain      = "example.org"
signer_address    = %q
trust_bundle_path = "bundle.pem"
socket_path       = %q
admin_socket_path = %q
tpm { socket = %q }
`, e.signerAddr, socket2, admin2, tpm2.Socket))
	start(t, "lanyard-agent", "run", "--config", cfg2).waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 120*time.Second)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	bot := "spiffe://example.org/bot"
	fetch := func(action string) string {
		t.Helper()
		svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "tools", Subject: spiffeid.RequireFromString(bot + "/action/" + action)})
		if err != nil {
			t.Fatalf("FetchJWTSVID action %s: %v", action, err)
		}
		return svid.Marshal()
	}

	t.Run("20 actions, each a fresh token validated once", func(t *testing.T) {
		jtis := map[string]bool{}
		for i := range 20 {
			action := fmt.Sprintf("tool/step%d", i)
			token := fetch(action)
			c := readTokenClaims(t, token)
			if jtis[c.ID] || c.ID == "" {
				t.Fatalf("action %d: jti %q empty or seen before", i, c.ID)
			}
			jtis[c.ID] = true
			if c.Subject != bot+"/action/"+action || c.Act.Sub != bot || c.Expiry.Time().Sub(c.IssuedAt.Time()) != actionTTL {
				t.Errorf("action %d: sub %s act %s lifetime %s", i, c.Subject, c.Act.Sub, c.Expiry.Time().Sub(c.IssuedAt.Time()))
			}
			if _, err := client.ValidateJWTSVID(ctx, token, "tools"); err != nil {
				t.Fatalf("action %d: first validation: %v", i, err)
			}
			if _, err := client.ValidateJWTSVID(ctx, token, "tools"); err == nil || !strings.Contains(err.Error(), "token already used") {
				t.Fatalf("action %d: second validation: %v, want token already used", i, err)
			}
		}
	})

	t.Run("never served to another process", func(t *testing.T) {
		mine := readTokenClaims(t, fetch("github.read")).ID
		seen := map[string]bool{mine: true}
		for range 2 {
			out, stderr, code := runAgentCmd(t, "", "fetch", "jwt", "--action", "github.read", "--audience", "tools", "--token-only", "--socket", e.socket)
			if code != 0 {
				t.Fatalf("fetch jwt --action: exit %d: %s", code, stderr)
			}
			c := readTokenClaims(t, strings.TrimSpace(out))
			if seen[c.ID] || c.Subject != bot+"/action/github.read" {
				t.Fatalf("another process got jti %s (seen before: %v), sub %s", c.ID, seen[c.ID], c.Subject)
			}
			seen[c.ID] = true
		}
		_, stderr, code := runAgentCmd(t, "", "fetch", "jwt", "--action", "db.drop", "--audience", "tools", "--socket", e.socket)
		if code != 1 || !strings.Contains(stderr, "PermissionDenied") || !strings.Contains(stderr, `"db.drop"`) {
			t.Errorf("action not allowed: exit %d, %s", code, stderr)
		}
	})

	t.Run("revoked on a second agent within a second, dropped once expired", func(t *testing.T) {
		token := fetch("tool/deploy")
		jti := readTokenClaims(t, token).ID
		client2, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket2))
		if err != nil {
			t.Fatal(err)
		}
		defer client2.Close()
		out, code := signerCmd(t, "token", "revoke", jti, "--reason", "agent misbehaved", "--admin-socket", e.signerAdmin)
		if code != 0 {
			t.Fatalf("token revoke: exit %d: %s", code, out)
		}
		// Checked first, so polling before it arrives only spends the
		// token: the answer turns to revoked once it is there.
		waitFor(t, time.Second, "the revocation refused on the second agent", func() bool {
			_, err := client2.ValidateJWTSVID(ctx, token, "tools")
			return err != nil && strings.Contains(err.Error(), "token revoked: agent misbehaved")
		})
		if n := revocationsInForce(t, admin2); n != 1 {
			t.Errorf("second agent: %d revocations in force, want 1", n)
		}
		// The signer keeps it until every token it covers has expired
		// (jwt_max_ttl); the agent for the validation leeway more.
		waitFor(t, actionTTL+45*time.Second, "the expired revocation dropped", func() bool {
			return revocationsInForce(t, admin2) == 0
		})
	})
}

func readOrFail(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// revocationsInForce reads jwt.revocations of `lanyard-agent status --json`.
func revocationsInForce(t *testing.T, adminSocket string) int {
	t.Helper()
	out, _ := agentCmd(t, nil, "status", "--json", "--admin-socket", adminSocket)
	var r struct {
		JWT struct {
			Revocations int `json:"revocations"`
		} `json:"jwt"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("status --json: %v:\n%s", err, out)
	}
	return r.JWT.Revocations
}

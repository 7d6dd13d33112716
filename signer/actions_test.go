package signer

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// actionsPolicy is jwtPolicy with an entry "bot" that allows actions.
const actionsPolicy = jwtPolicy + `
workload "bot" {
  spiffe_id = "spiffe://example.org/bot"
  nodes     = ["lab"]
  selectors = ["unix:uid:1003"]
  actions {
    ttl   = "60s"
    names = ["github.read", "db/*"]
  }
}
`

// newActionsSigner is newJWTTestSigner with actionsPolicy.
func newActionsSigner(t *testing.T, extra string) *Signer {
	t.Helper()
	s := newJWTTestSigner(t, t.TempDir(), extra)
	if err := os.WriteFile(s.cfg.PolicyPath, []byte(actionsPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := New(s.cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	s2.agents[testAgent] = &agentRecord{names: []string{"lab"}}
	return s2
}

// TestActionMint: an allowed action gets a token whose sub is the action
// ID, act the entry's ID, jti the one reported, exp now + the action ttl;
// go-spiffe validates it against the signer's bundle; one audit line
// without the token; every other request is refused with its reason.
func TestActionMint(t *testing.T) {
	var logs bytes.Buffer
	s := newActionsSigner(t, "")
	s.log = hclog.New(&hclog.LoggerOptions{Output: &logs, JSONFormat: true, Level: hclog.Info})
	a := &api{s: s}
	ctx := agentContext(t, s)
	before := time.Now()
	resp, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: []*signerpb.JWTSVIDRequest{
		{EntryId: "bot", Action: "github.read", Audience: []string{"https://api.github.com"}},
		{EntryId: "bot", Action: "db/main", Audience: []string{"db"}},
		{EntryId: "bot", Audience: []string{"x"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	jtis := map[string]bool{}
	for i, want := range []string{"spiffe://example.org/bot/action/github.read", "spiffe://example.org/bot/action/db/main", "spiffe://example.org/bot"} {
		out := resp.GetSvids()[i]
		if out.GetError() != "" || out.GetToken() == "" {
			t.Fatalf("request %d refused: %s", i+1, out.GetError())
		}
		aud := []string{"https://api.github.com", "db", "x"}[i]
		svid, err := jwtsvid.ParseAndValidate(out.GetToken(), jwtBundle(t, s), []string{aud})
		if err != nil {
			t.Fatalf("request %d: go-spiffe refuses the token: %v", i+1, err)
		}
		if svid.ID.String() != want {
			t.Errorf("request %d: sub = %s, want %s", i+1, svid.ID, want)
		}
		tok, err := jwt.ParseSigned(out.GetToken(), []jose.SignatureAlgorithm{jose.ES256})
		if err != nil {
			t.Fatal(err)
		}
		var claims jwt.Claims
		var extra struct {
			Act map[string]string `json:"act"`
		}
		if err := tok.UnsafeClaimsWithoutVerification(&claims, &extra); err != nil {
			t.Fatal(err)
		}
		if claims.ID == "" || claims.ID != out.GetJti() || jtis[claims.ID] {
			t.Errorf("request %d: jti %q, reported %q, seen before %v", i+1, claims.ID, out.GetJti(), jtis[claims.ID])
		}
		jtis[claims.ID] = true
		if claims.Expiry.Time().Unix() != out.GetExpiresAt() {
			t.Errorf("request %d: exp %v, reported expires_at %d", i+1, claims.Expiry.Time(), out.GetExpiresAt())
		}
		if i == 2 {
			if extra.Act != nil {
				t.Errorf("the entry's own token has an act claim %v", extra.Act)
			}
			continue
		}
		if len(extra.Act) != 1 || extra.Act["sub"] != "spiffe://example.org/bot" {
			t.Errorf("request %d: act = %v, want {sub: spiffe://example.org/bot}", i+1, extra.Act)
		}
		iat := claims.IssuedAt.Time()
		if iat.Before(before.Truncate(time.Second)) || !claims.Expiry.Time().Equal(iat.Add(time.Minute)) {
			t.Errorf("request %d: iat %v exp %v, want exp = iat + 60s", i+1, iat, claims.Expiry.Time())
		}
	}

	// The audit lines of the actions: agent, entry, action, audience,
	// jti, exp; never the token.
	n := 0
	for line := range strings.Lines(logs.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatal(err)
		}
		if m["@message"] != "action jwt-svid minted" {
			continue
		}
		out := resp.GetSvids()[n]
		if m["agent"] != testAgent.String() || m["entry"] != "bot" || m["action"] != []string{"github.read", "db/main"}[n] ||
			m["audience"] != []string{"https://api.github.com", "db"}[n] || m["jti"] != out.GetJti() || m["exp"] == nil {
			t.Errorf("audit line %d = %v", n+1, m)
		}
		n++
	}
	if n != 2 {
		t.Errorf("%d action audit lines, want 2", n)
	}
	for _, out := range resp.GetSvids() {
		if strings.Contains(logs.String(), strings.Split(out.GetToken(), ".")[2]) {
			t.Fatal("the log holds a token")
		}
	}

	// Refusals: per request, with the reason the workload will read.
	for _, tc := range []struct {
		name, entry, action string
		aud                 []string
		want                string
	}{
		{"entry without actions", "mine", "github.read", []string{"a"}, "entry mine allows no actions"},
		{"action not listed", "bot", "github.write", []string{"a"}, `action "github.write" not allowed for entry bot`},
		{"wildcard is one segment", "bot", "db/main/drop", []string{"a"}, `action "db/main/drop" not allowed for entry bot`},
		{"a pattern is no action", "bot", "db/*", []string{"a"}, `bad action name "db/*": segment 2 "*": use letters, digits, '.', '-' and '_'`},
		{"two audiences", "bot", "github.read", []string{"a", "b"}, "an action token takes exactly one audience"},
		{"another node's entry", "theirs", "github.read", []string{"a"}, `entry "theirs": entry is not authorized for this node`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: []*signerpb.JWTSVIDRequest{
				{EntryId: tc.entry, Action: tc.action, Audience: tc.aud},
			}})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetSvids()[0]; got.GetError() != tc.want || got.GetToken() != "" || got.GetJti() != "" {
				t.Errorf("answer %+v, want refusal %q", got, tc.want)
			}
		})
	}
}

// TestActionTTLCapped: an action token lives at most jwt_max_ttl.
func TestActionTTLCapped(t *testing.T) {
	s := newActionsSigner(t, "jwt_max_ttl = \"10s\"\n")
	now := time.Now()
	m, err := s.mintOne(testAgent, &signerpb.JWTSVIDRequest{EntryId: "bot", Action: "github.read", Audience: []string{"a"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := now.Truncate(time.Second).Add(10 * time.Second); !m.exp.Equal(want) {
		t.Errorf("exp = %v, want %v", m.exp, want)
	}
}

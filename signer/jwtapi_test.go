package signer

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// agentContext is the context of a call made with testAgent's SVID, as
// the TLS layer would leave it.
func agentContext(t *testing.T, s *Signer) context.Context {
	t.Helper()
	s.mu.Lock()
	leaf, err := s.auth.sign(newPub(t), testAgent, time.Hour, nil, time.Now())
	s.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	info := credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}}
	return peer.NewContext(t.Context(), &peer.Peer{AuthInfo: info})
}

func TestMintJWTSVIDsRPC(t *testing.T) {
	var logs bytes.Buffer
	s := newJWTTestSigner(t, t.TempDir(), "")
	s.log = hclog.New(&hclog.LoggerOptions{Output: &logs, JSONFormat: true, Level: hclog.Info})
	ctx := agentContext(t, s)
	a := &api{s: s}

	resp, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: []*signerpb.JWTSVIDRequest{
		{EntryId: "theirs", Audience: []string{"x"}},
		{EntryId: "mine", Audience: []string{"x", "y"}},
		{EntryId: "nosuch", Audience: []string{"x"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range resp.GetSvids() {
		got = append(got, r.GetEntryId()+": "+r.GetError())
	}
	want := []string{
		`theirs: entry "theirs": entry is not authorized for this node`,
		"mine: ",
		`nosuch: entry "nosuch": no such entry in the policy`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("answers, in order:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	token := resp.GetSvids()[1].GetToken()
	if token == "" {
		t.Fatal("no token for the agent's own entry")
	}
	checkToken(t, s, token, "spiffe://example.org/mine", []string{"x", "y"}, time.Now(), time.Hour)

	// One audit line per token, with fixed keys, and never the token.
	if strings.Contains(logs.String(), token) || strings.Contains(logs.String(), strings.Split(token, ".")[2]) {
		t.Fatal("the log holds the token")
	}
	var audits []map[string]any
	for line := range strings.Lines(logs.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if m["@message"] == "jwt-svid minted" {
			audits = append(audits, m)
		}
	}
	if len(audits) != 1 {
		t.Fatalf("%d audit lines, want 1", len(audits))
	}
	for key, want := range map[string]any{
		"agent": testAgent.String(), "entry": "mine", "spiffe_id": "spiffe://example.org/mine",
		"audience": []any{"x", "y"}, "kid": s.auth.activeJWT.kid, "@level": "info",
	} {
		if g, _ := json.Marshal(audits[0][key]); string(g) != mustJSON(t, want) {
			t.Errorf("audit %s = %s, want %s", key, g, mustJSON(t, want))
		}
	}
	if _, err := time.Parse(time.RFC3339, audits[0]["exp"].(string)); err != nil {
		t.Errorf("audit exp: %v", err)
	}

	tooMany := slices.Repeat([]*signerpb.JWTSVIDRequest{{EntryId: "mine", Audience: []string{"x"}}}, maxJWTRequests+1)
	if _, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: tooMany}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("batch over the bound: error %v, want InvalidArgument", err)
	}
	if _, err := a.MintJWTSVIDs(t.Context(), &signerpb.MintJWTSVIDsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("call without an agent SVID: error %v, want Unauthenticated", err)
	}
}

func TestMintAudienceChecks(t *testing.T) {
	s := newJWTTestSigner(t, t.TempDir(), "")
	a := &api{s: s}
	ctx := agentContext(t, s)
	tests := []struct {
		name    string
		aud     []string
		wantMsg string // "" for success
	}{
		{"plain", []string{"spiffe://example.org/db", "https://api.example.com"}, ""},
		{"non-ASCII letters", []string{"für-dich"}, ""},
		{"no audience", nil, `request 1 (entry "mine"): a JWT-SVID needs at least one audience`},
		{"empty value", []string{"a", ""}, `request 1 (entry "mine"): bad audience: value 2 is empty`},
		{"NUL", []string{"p\x00q"}, `request 1 (entry "mine"): bad audience: value 1 holds control character U+0000 at byte 1`},
		{"newline", []string{"a\nb"}, `bad audience: value 1 holds control character U+000A at byte 1`},
		{"DEL", []string{"a\x7f"}, `bad audience: value 1 holds control character U+007F at byte 1`},
		{"C1 control", []string{"ab\u0085"}, `bad audience: value 1 holds control character U+0085 at byte 2`},
		{"invalid UTF-8", []string{"a\xffb"}, `bad audience: value 1 is not valid UTF-8`},
		{"too long", []string{strings.Repeat("a", maxAudienceBytes+1)}, `bad audience: value 1 is 1025 bytes (limit 1024)`},
		{"too many", make([]string, maxAudiences+1), `bad audience: 33 values (limit 32)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: []*signerpb.JWTSVIDRequest{
				{EntryId: "mine", Audience: tt.aud},
			}})
			if tt.wantMsg == "" {
				if err != nil || resp.GetSvids()[0].GetToken() == "" {
					t.Fatalf("MintJWTSVIDs: %v %v, want a token", resp, err)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tt.wantMsg) {
				t.Fatalf("MintJWTSVIDs: %v, want InvalidArgument with %q", err, tt.wantMsg)
			}
		})
	}
	// A bad audience in any request refuses the call: nothing is minted.
	resp, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: []*signerpb.JWTSVIDRequest{
		{EntryId: "mine", Audience: []string{"ok"}},
		{EntryId: "short", Audience: []string{"p\x00q"}},
	}})
	if status.Code(err) != codes.InvalidArgument || resp != nil || !strings.Contains(err.Error(), `request 2 (entry "short")`) {
		t.Errorf("call with one bad request: %v %v, want InvalidArgument naming request 2 and no tokens", resp, err)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

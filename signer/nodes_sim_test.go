//go:build cgo

package signer

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// simAgent is a simulated TPM that attests like the agent does.
type simAgent struct {
	tpm *node.TPM
	ek  string
}

func newSimAgent(t *testing.T) *simAgent {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(7)
	if err != nil {
		t.Fatalf("start simulator: %v", err)
	}
	tpm, err := node.OpenTPMChannel(sim)
	if err != nil {
		sim.Close()
		t.Fatalf("OpenTPMChannel: %v", err)
	}
	t.Cleanup(func() { tpm.Close() })
	info, err := tpm.Info()
	if err != nil {
		t.Fatal(err)
	}
	return &simAgent{tpm: tpm, ek: info.EKSHA256}
}

// attest runs one attestation with version in the request metadata and
// returns the agent SVID, or the signer's error.
func (a *simAgent) attest(t *testing.T, c signerpb.SignerClient, version string) (*x509svid.SVID, error) {
	t.Helper()
	sess, err := a.tpm.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	ev, err := sess.Evidence()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(t.Context(), signerpb.AgentVersionHeader, version), 30*time.Second)
	defer cancel()
	return attestSim(ctx, c, sess, ev)
}

// attestAndSync attests a with s (version in the metadata), opens a Sync
// stream with the agent SVID, and returns the SVID, the client on that
// mTLS connection, the stream (ended with the test) and its first message.
func (a *simAgent) attestAndSync(t *testing.T, s *servedSigner, version string) (*x509svid.SVID, signerpb.SignerClient, grpc.ServerStreamingClient[signerpb.SyncResponse], *signerpb.SyncResponse) {
	t.Helper()
	svid, err := a.attest(t, s.dial(t, "127.0.0.1"), version)
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	cc := signerpb.NewSignerClient(s.dialAs(t, "127.0.0.1", svid))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	st, err := cc.Sync(ctx, &signerpb.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil {
		t.Fatalf("first Sync message: %v", err)
	}
	return svid, cc, st, first
}

func nodePolicy(ek string) string {
	return `node "lab" {
  ek_sha256 = ["` + ek + `"]
}
workload "web" {
  spiffe_id = "spiffe://example.org/web"
  nodes     = ["lab"]
  selectors = ["unix:uid:0"]
}
`
}

// wantRevoked checks err is the revoked node's refusal, word for word.
func wantRevoked(t *testing.T, what string, err error, reason string) {
	t.Helper()
	if status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "node revoked: "+reason {
		t.Errorf("%s: %v, want PermissionDenied %q", what, err, "node revoked: "+reason)
	}
}

// TestNodeRevocation: an attested agent is in the registry; revoking it
// ends its open Sync stream at once and refuses its Attest, Sync, signing
// and minting with the exact message; the revocation survives a restart
// (New on the same state_dir); unrevoke lets it attest and be served again.
func TestNodeRevocation(t *testing.T) {
	a := newSimAgent(t)
	s := serveTestSigner(t, nodePolicy(a.ek), "")
	svid, cc, st, _ := a.attestAndSync(t, s, "v1.2.3")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var err error

	nodes := s.Nodes()
	if len(nodes) != 1 {
		t.Fatalf("registry holds %d nodes, want 1: %+v", len(nodes), nodes)
	}
	n := nodes[0]
	if n.EKSHA256 != a.ek || n.AgentID != svid.ID.String() || strings.Join(n.Nodes, ",") != "lab" || !n.Connected ||
		n.AgentVersion != "v1.2.3" || n.FirstAttested.IsZero() || n.LastAttested.Before(n.FirstAttested) || n.Revoked != nil {
		t.Errorf("registry entry = %+v", n)
	}

	// Bad input is refused precisely and changes nothing.
	for _, tc := range []struct {
		name, node, reason string
		want               error
	}{
		{"unknown EK", strings.Repeat("cd", 32), "gone", ErrUnknownNode},
		{"unknown agent ID", "spiffe://example.org/lanyard/agent/tpm/" + strings.Repeat("cd", 32), "gone", ErrUnknownNode},
		{"not an agent ID", "spiffe://example.org/web", "gone", ErrBadNodeName},
		{"other trust domain", "spiffe://other.org/lanyard/agent/tpm/" + a.ek, "gone", ErrBadNodeName},
		{"short hash", "abc", "gone", ErrBadNodeName},
		{"empty reason", a.ek, "  ", ErrBadReason},
		{"control character", a.ek, "stolen\nagent attested", ErrBadReason},
		{"oversized reason", a.ek, strings.Repeat("x", maxReasonBytes+1), ErrBadReason},
	} {
		if _, err := s.Revoke(tc.node, tc.reason, 0); !errors.Is(err, tc.want) {
			t.Errorf("%s: Revoke = %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, err := s.Unrevoke(a.ek, 0); !errors.Is(err, ErrNotRevoked) {
		t.Errorf("Unrevoke of a node not revoked = %v, want ErrNotRevoked", err)
	}
	if n := s.Nodes(); n[0].Revoked != nil {
		t.Fatalf("bad input revoked the node: %+v", n[0])
	}

	const reason = "host stolen"
	start := time.Now()
	if _, err := s.Revoke(svid.ID.String(), reason, 0); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	_, err = st.Recv()
	took := time.Since(start)
	wantRevoked(t, "open Sync stream after revoke", err, reason)
	if took > time.Second {
		t.Errorf("Sync stream ended %v after the revocation, want at once", took)
	}
	t.Logf("revoke to Sync closed: %v", took)
	if _, err := s.Revoke(a.ek, "again", 0); !errors.Is(err, ErrAlreadyRevoked) {
		t.Errorf("second Revoke = %v, want ErrAlreadyRevoked", err)
	}

	// Every call is refused, the agent SVID it still holds included.
	_, err = cc.SignX509SVIDs(ctx, &signerpb.SignX509SVIDsRequest{Csrs: []*signerpb.CSR{{EntryId: "web"}}})
	wantRevoked(t, "SignX509SVIDs", err, reason)
	_, err = cc.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: []*signerpb.JWTSVIDRequest{{EntryId: "web", Audience: []string{"a"}}}})
	wantRevoked(t, "MintJWTSVIDs", err, reason)
	st2, err := cc.Sync(ctx, &signerpb.SyncRequest{})
	if err == nil {
		_, err = st2.Recv()
	}
	wantRevoked(t, "new Sync", err, reason)
	_, err = a.attest(t, s.dial(t, "127.0.0.1"), "v1.2.3")
	wantRevoked(t, "Attest", err, reason)
	logs := s.logs.String()
	for _, want := range []string{`"@message":"node revoked"`, `"by_uid":0`, `"reason":"host stolen"`, `"call refused: node revoked"`, `"method":"Attest"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %s:\n%s", want, logs)
		}
	}

	// Persisted: a signer started on the same state_dir refuses it too.
	var file nodesFile
	b, err := os.ReadFile(filepath.Join(s.cfg.StateDir, NodesStateFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &file); err != nil || len(file.Nodes) != 1 || file.Nodes[0].Revoked == nil ||
		file.Nodes[0].Revoked.Reason != reason || file.Nodes[0].Connected {
		t.Errorf("%s = %s (%v)", NodesStateFile, b, err)
	}
	s2, err := New(s.cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("New after revoke: %v", err)
	}
	if n := s2.Nodes(); len(n) != 1 || n[0].Revoked == nil || n[0].Revoked.Reason != reason || n[0].Connected {
		t.Errorf("restarted registry = %+v", n)
	}

	// Unrevoke: the agent attests again and is served.
	if _, err := s.Unrevoke(a.ek, 0); err != nil {
		t.Fatalf("Unrevoke: %v", err)
	}
	svid, err = a.attest(t, s.dial(t, "127.0.0.1"), "v1.2.4")
	if err != nil {
		t.Fatalf("attest after unrevoke: %v", err)
	}
	st3, err := signerpb.NewSignerClient(s.dialAs(t, "127.0.0.1", svid)).Sync(ctx, &signerpb.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if msg, err := st3.Recv(); err != nil || len(msg.GetEntries()) != 1 {
		t.Fatalf("Sync after unrevoke: %v, %v", msg, err)
	}
	if n := s.Nodes(); n[0].Revoked != nil || n[0].AgentVersion != "v1.2.4" || !n[0].Connected {
		t.Errorf("registry after unrevoke = %+v", n[0])
	}
	if !strings.Contains(s.logs.String(), `"@message":"node unrevoked"`) {
		t.Errorf("no unrevoke audit line:\n%s", s.logs)
	}
}

// TestNodesStateRefused: an unreadable registry stops New with
// ErrBadNodesState naming the file, and is left as it was.
func TestNodesStateRefused(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir, "")
	path := filepath.Join(cfg.StateDir, NodesStateFile)
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"{", `{"nodes":[{"ek_sha256":"XYZ"}]}`} {
		writeTestFile(t, path, bad)
		_, err := New(cfg, hclog.NewNullLogger())
		if !errors.Is(err, ErrBadNodesState) || !strings.Contains(err.Error(), path) {
			t.Errorf("New with %s = %q: %v, want ErrBadNodesState naming the file", NodesStateFile, bad, err)
		}
		if b, _ := os.ReadFile(path); string(b) != bad {
			t.Errorf("%s rewritten: %q", path, b)
		}
	}
}

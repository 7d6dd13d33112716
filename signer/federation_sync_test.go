package signer

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestFederationSyncPush: an agent whose entry federates_with other.org
// receives other.org's bundle on its Sync stream, and a push when
// other.org publishes a CA; a name without a federation block loads with
// a warning in status and sends nothing.
func TestFederationSyncPush(t *testing.T) {
	root := t.TempDir()
	b := newFedTestSigner(t, filepath.Join(root, "b"), otherTD, "", "")
	b.serve(t)
	a := newFedTestSigner(t, filepath.Join(root, "a"), testTD, `workload "web" {
  spiffe_id      = "spiffe://example.org/web"
  nodes          = ["lab"]
  selectors      = ["unix:uid:0"]
  federates_with = ["other.org", "third.org"]
}
`, "")
	a.federate(t, b, "spiffe://other.org/lanyard/signer")
	a.serve(t)
	if w := a.Status(time.Now()).Warnings; !slices.Equal(w, []string{"federates_with third.org: no federation block"}) {
		t.Errorf("status warnings = %q", w)
	}
	if !strings.Contains(a.logs.String(), `"trust_domain":"third.org"`) {
		t.Errorf("no warning logged for third.org:\n%s", a.logs.String())
	}

	trust, err := x509bundle.Load(testTD, a.cfg.BundlePath)
	if err != nil {
		t.Fatal(err)
	}
	served := &servedSigner{Signer: a.Signer, addr: a.serveAddr, trust: trust}
	svid := served.agentSVID(t, spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/"+strings.Repeat("ab", 32)))
	cc := signerpb.NewSignerClient(served.dialAs(t, "127.0.0.1", svid))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	st, err := cc.Sync(ctx, &signerpb.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// recvUntil reads the stream until a message whose other.org bundle
	// holds exactly want CAs and JWT keys of other.org.
	recvUntil := func(what string) *signerpb.SyncResponse {
		t.Helper()
		for {
			resp, err := st.Recv()
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if len(resp.GetEntries()) != 1 || !slices.Equal(resp.GetEntries()[0].GetFederatesWith(), []string{"other.org", "third.org"}) {
				t.Fatalf("entries = %v", resp.GetEntries())
			}
			fb := resp.GetFederatedBundles()
			if len(fb) != 1 || fb[0].GetTrustDomain() != "other.org" {
				t.Fatalf("federated bundles = %v, want other.org's only", fb)
			}
			b.mu.Lock()
			want := b.agentBundle
			b.mu.Unlock()
			if len(fb[0].GetX509Authorities()) == len(want.GetX509Authorities()) && len(fb[0].GetJwtAuthorities()) == len(want.GetJwtAuthorities()) {
				return resp
			}
		}
	}
	recvUntil("other.org's fetched bundle")
	if _, err := b.advanceCAs(time.Now().Add(25 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	resp := recvUntil("other.org's next CA pushed")
	if got, want := resp.GetFederatedBundles()[0].GetSequence(), b.BundleSequence(); got != want {
		t.Errorf("pushed sequence %d, want other.org's %d", got, want)
	}

	// A refetch of the same bundle wakes no stream.
	a.mu.Lock()
	changed := a.changed
	a.mu.Unlock()
	last := a.fedStatus(t, otherTD).LastSuccess
	within(t, 10*time.Second, "a refetch", func() bool { return a.fedStatus(t, otherTD).LastSuccess.After(last) })
	select {
	case <-changed:
		t.Error("an unchanged refetch woke the Sync streams")
	default:
	}
}

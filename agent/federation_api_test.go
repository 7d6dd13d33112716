package agent

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/lanyard-dev/lanyard/internal/testwait"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	goworkload "github.com/spiffe/go-spiffe/v2/workloadapi"
)

// serveAgent serves a's cache and JWT source on a real Workload API
// socket until the test ends, and returns a go-spiffe client on it.
func serveAgent(t *testing.T, a *Agent) *goworkload.Client {
	t.Helper()
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "w.sock")
	srv := workloadapi.New(workloadapi.Config{SocketPath: path, Attestor: unixOnly, Source: a.cache, JWT: a.jwt})
	runPart(t, srv.Run)
	select {
	case <-srv.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("Workload API not ready after 10s")
	}
	c, err := goworkload.New(t.Context(), goworkload.WithAddr("unix://"+path))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestFederationThroughWorkloadAPI follows federated bundles from the sync
// stream (a fake signer: the only fake) through the upstream, the cache
// and the real Workload API server to go-spiffe's client: the caller's
// entry federates with other.org, so its X.509 context, its X.509 and JWT
// bundles carry other.org's, a JWT-SVID of other.org validates for it, a
// new other.org CA is pushed to its open stream, and once its entry stops
// federating all of that is gone.
func TestFederationThroughWorkloadAPI(t *testing.T) {
	uid := "unix:uid:" + strconv.Itoa(os.Getuid())
	federating := &signerpb.Entry{Id: "web", SpiffeId: "spiffe://example.org/web", Selectors: []string{uid}, Revision: 1,
		X509TtlSeconds: 3600, FederatesWith: []string{"other.org"}}
	f := newFakeSigner(t, time.Hour, federating)
	ca1, ca2 := testca.New(t, "other CA 1", otherTD), testca.New(t, "other CA 2", otherTD)
	key := newFedJWTKey(t, "other-k1")
	f.setFederated(wireFed(t, "other.org", 1, []*testca.CA{ca1}, key))
	a := loopAgent(t, f)
	waitReady(t, a, 10*time.Second)
	client := serveAgent(t, a)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	otherCAs := func(set x509bundle.Source) int {
		b, err := set.GetX509BundleForTrustDomain(otherTD)
		if err != nil {
			return 0
		}
		return len(b.X509Authorities())
	}

	x509ctx, err := client.FetchX509Context(ctx)
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	if n := otherCAs(x509ctx.Bundles); n != 1 {
		t.Errorf("X.509 context holds %d CAs of other.org, want 1", n)
	}
	bundles, err := client.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	if n := otherCAs(bundles); n != 1 || bundles.Len() != 2 {
		t.Errorf("X.509 bundles: %d trust domains, %d CAs of other.org; want 2 and 1", bundles.Len(), n)
	}
	jwtBundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if b, err := jwtBundles.GetJWTBundleForTrustDomain(otherTD); err != nil || !b.HasJWTAuthority("other-k1") {
		t.Errorf("JWT bundles lack other.org's key other-k1 (%v)", err)
	}
	token := key.mint(t, "spiffe://other.org/client", "web")
	got, err := client.ValidateJWTSVID(ctx, token, "web")
	if err != nil {
		t.Fatalf("ValidateJWTSVID of an other.org token: %v", err)
	}
	if got.ID.String() != "spiffe://other.org/client" {
		t.Errorf("validated ID = %s", got.ID)
	}
	if _, err := client.ValidateJWTSVID(ctx, token, "db"); err == nil {
		t.Error("an other.org token for another audience validated")
	}
	if r := a.Report(time.Now()); len(r.Federated) != 1 || r.Federated[0].TrustDomain != "other.org" ||
		r.Federated[0].Sequence != 1 || len(r.Federated[0].CAs) != 1 || r.Federated[0].JWTKeyIDs[0] != "other-k1" {
		t.Errorf("status federated bundles = %+v", r.Federated)
	}

	t.Run("rotation reaches the open stream", func(t *testing.T) {
		src, err := goworkload.NewX509Source(ctx, goworkload.WithClient(client))
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		f.setFederated(wireFed(t, "other.org", 2, []*testca.CA{ca1, ca2}, key))
		testwait.For(t, 10*time.Second, "other.org's second CA at the X509Source", func() bool {
			b, err := src.GetX509BundleForTrustDomain(otherTD)
			return err == nil && len(b.X509Authorities()) == 2
		})
	})

	t.Run("entry stops federating", func(t *testing.T) {
		plain := &signerpb.Entry{Id: "web", SpiffeId: "spiffe://example.org/web", Selectors: []string{uid}, Revision: 2, X509TtlSeconds: 3600}
		f.setEntries(plain)
		testwait.For(t, 10*time.Second, "an X.509 context without other.org", func() bool {
			x, err := client.FetchX509Context(ctx)
			return err == nil && x.Bundles.Len() == 1 && otherCAs(x.Bundles) == 0
		})
		if b, err := client.FetchX509Bundles(ctx); err != nil || b.Len() != 1 {
			t.Errorf("FetchX509Bundles = %v trust domains (%v), want the own one", b.Len(), err)
		}
		_, err := client.ValidateJWTSVID(ctx, token, "web")
		if err == nil || !strings.Contains(err.Error(), "no entry of the caller federates with it") {
			t.Errorf("ValidateJWTSVID of an other.org token = %v, want refused: no entry federates", err)
		}
	})
}

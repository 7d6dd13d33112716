package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// fedDomain is one trust domain of the federation test: a signer with a
// bundle endpoint, and one agent on its own swtpm.
type fedDomain struct {
	td                            spiffeid.TrustDomain
	dir, signerAddr, endpointAddr string
	signerCfg, bundlePath, socket string
	adminSocket                   string
	base                          string // the signer config without federation blocks
	agentTPM                      *swtpmtest.TPM
}

// newFedDomain writes td's policy (one workload for this process's uid,
// federating with peer), its agent's config and its signer's, extra
// added to the signer's. The bundle endpoint is https_spiffe on loopback.
func newFedDomain(t *testing.T, td, peer, workloadName, extra string) *fedDomain {
	t.Helper()
	d := shortDir(t)
	f := &fedDomain{
		td: spiffeid.RequireTrustDomainFromString(td), dir: d, signerAddr: freePort(t), endpointAddr: freePort(t),
		signerCfg: filepath.Join(d, "signer.hcl"), bundlePath: filepath.Join(d, "bundle.pem"),
		socket: filepath.Join(d, "w.sock"), adminSocket: filepath.Join(d, "admin", "a.sock"), agentTPM: swtpmtest.Start(t),
	}
	writeFile(t, filepath.Join(d, "policy.hcl"), fmt.Sprintf(`node "lab" {
  ek_ca = [%q]
}
workload %q {
  spiffe_id      = "spiffe://%[3]s/%[2]s"
  nodes          = ["lab"]
  selectors      = ["unix:uid:%[4]d"]
  x509_ttl       = "20s"
  federates_with = [%[5]q]
}
`, f.agentTPM.EKCAPath, workloadName, td, os.Getuid(), peer))
	f.base = fmt.Sprintf(`trust_domain      = %q
listen_address    = %q
policy_path       = "policy.hcl"
bundle_path       = "bundle.pem"
state_dir         = %q
admin_socket_path = %q
bundle_endpoint {
  listen_address = %q
  refresh_hint   = "10s"
}
%s`, td, f.signerAddr, filepath.Join(d, "state"), filepath.Join(d, "signer-admin", "admin.sock"), f.endpointAddr, extra)
	writeFile(t, f.signerCfg, f.base)
	writeFile(t, filepath.Join(d, "agent.hcl"), fmt.Sprintf(`trust_domain      = %q
signer_address    = %q
trust_bundle_path = "bundle.pem"
socket_path       = %q
admin_socket_path = %q
tpm { socket = %q }
`, td, f.signerAddr, f.socket, f.adminSocket, f.agentTPM.Socket))
	return f
}

// federateWith adds a federation block for peer, bootstrapped with the
// bundle file peer's signer writes.
func (f *fedDomain) federateWith(t *testing.T, peer *fedDomain) {
	t.Helper()
	writeFile(t, f.signerCfg, f.base+fmt.Sprintf(`federation %q {
  bundle_endpoint_url = "https://%s"
  profile             = "https_spiffe"
  endpoint_spiffe_id  = "spiffe://%[1]s/lanyard/signer"
  bootstrap_bundle    = %[3]q
}
`, peer.td.Name(), peer.endpointAddr, peer.bundlePath))
}

func (f *fedDomain) startSigner(t *testing.T) *proc {
	t.Helper()
	p := start(t, "lanyard-signer", "run", "--config", f.signerCfg)
	p.waitLog(t, 10*time.Second, "signer listening")
	return p
}

// source is an X509Source on f's agent.
func (f *fedDomain) source(t *testing.T, ctx context.Context) *workloadapi.X509Source {
	t.Helper()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+f.socket)))
	if err != nil {
		t.Fatalf("X509Source on %s's agent: %v", f.td.Name(), err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// fedCAs returns the CAs src holds for td (nil when none).
func fedCAs(src x509bundle.Source, td spiffeid.TrustDomain) []*x509.Certificate {
	b, err := src.GetX509BundleForTrustDomain(td)
	if err != nil {
		return nil
	}
	return b.X509Authorities()
}

// TestFederationTwoTrustDomains: example.org and other.org, each with its
// own signer, agent and swtpm, federated both ways over https_spiffe
// (each signer's federation block bootstrapped with the other's
// bundle_path). A go-spiffe mTLS server in example.org and a client in
// other.org authorize each other by SPIFFE ID; a JWT-SVID of other.org
// validates through example.org's agent; a new CA of other.org (ca_ttl
// 1m) reaches example.org's workload by the refresh hint (10s); status
// lists the federated bundle.
//
// Bootstrap order: each side needs the other's bundle file at start. The
// example.org signer seals its keys to its own TPM, so it can start once
// alone to write its bundle, then again, with the same keys, federating
// with other.org, which started in between.
func TestFederationTwoTrustDomains(t *testing.T) {
	t.Parallel()
	ex := newFedDomain(t, "example.org", "other.org", "server", fmt.Sprintf("tpm { socket = %q }\n", swtpmtest.Start(t).Socket))
	other := newFedDomain(t, "other.org", "example.org", "client", "ca_ttl = \"1m\"\nca_publish_lead = \"15s\"\n")

	first := ex.startSigner(t)
	first.stop(t)
	other.federateWith(t, ex)
	other.startSigner(t)
	ex.federateWith(t, other)
	exSigner := ex.startSigner(t)
	exSigner.waitLog(t, 10*time.Second, "federated bundle")
	for _, d := range []*fedDomain{ex, other} {
		start(t, "lanyard-agent", "run", "--config", filepath.Join(d.dir, "agent.hcl")).waitLog(t, 20*time.Second, "agent ready")
	}

	ctx := ctxFor(t, 60*time.Second)
	serverSrc, clientSrc := ex.source(t, ctx), other.source(t, ctx)
	waitFor(t, 15*time.Second, "each workload holding the other domain's bundle", func() bool {
		return len(fedCAs(serverSrc, other.td)) > 0 && len(fedCAs(clientSrc, ex.td)) > 0
	})
	serverID := spiffeid.RequireFromString("spiffe://example.org/server")
	clientID := spiffeid.RequireFromString("spiffe://other.org/client")

	t.Run("mTLS across trust domains", func(t *testing.T) {
		mtlsHello(t, ctx, serverSrc, clientSrc, serverID, clientID)
	})

	t.Run("JWT-SVID of other.org validates in example.org", func(t *testing.T) {
		otherClient, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+other.socket))
		if err != nil {
			t.Fatal(err)
		}
		defer otherClient.Close()
		exClient, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+ex.socket))
		if err != nil {
			t.Fatal(err)
		}
		defer exClient.Close()
		svid, err := otherClient.FetchJWTSVID(ctx, jwtsvid.Params{Audience: serverID.String()})
		if err != nil {
			t.Fatalf("FetchJWTSVID on other.org: %v", err)
		}
		got, err := exClient.ValidateJWTSVID(ctx, svid.Marshal(), serverID.String())
		if err != nil {
			t.Fatalf("ValidateJWTSVID on example.org: %v", err)
		}
		if got.ID != clientID {
			t.Errorf("validated ID = %s, want %s", got.ID, clientID)
		}
		if _, err := exClient.ValidateJWTSVID(ctx, svid.Marshal(), "spiffe://example.org/other"); err == nil {
			t.Error("a token for another audience validated")
		}
	})

	t.Run("status lists the federated bundle", func(t *testing.T) {
		out, code := agentCmd(t, nil, "status", "--json", "--admin-socket", ex.adminSocket)
		var r struct {
			Federated []struct {
				TrustDomain string            `json:"trust_domain"`
				Sequence    uint64            `json:"sequence"`
				CAs         []json.RawMessage `json:"cas"`
			} `json:"federated_bundles"`
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil || code > 1 {
			t.Fatalf("status exit %d, %v:\n%s", code, err, out)
		}
		if len(r.Federated) != 1 || r.Federated[0].TrustDomain != "other.org" || r.Federated[0].Sequence == 0 || len(r.Federated[0].CAs) == 0 {
			t.Errorf("federated_bundles = %+v, want other.org with its CAs and sequence", r.Federated)
		}
	})

	t.Run("a new CA of other.org reaches example.org by the refresh hint", func(t *testing.T) {
		held := fedCAs(serverSrc, other.td)
		isNew := func(ca *x509.Certificate) bool {
			return !slices.ContainsFunc(held, func(h *x509.Certificate) bool { return h.Equal(ca) })
		}
		var fresh *x509.Certificate
		waitFor(t, 40*time.Second, "other.org's signer to publish a new CA", func() bool {
			b, err := x509bundle.Load(other.td, other.bundlePath)
			if err != nil {
				return false
			}
			i := slices.IndexFunc(b.X509Authorities(), isNew)
			if i >= 0 {
				fresh = b.X509Authorities()[i]
			}
			return fresh != nil
		})
		// The hint, plus a fetch and a push through the agent.
		waitFor(t, 15*time.Second, "example.org's workload to hold other.org's new CA", func() bool {
			return slices.ContainsFunc(fedCAs(serverSrc, other.td), func(c *x509.Certificate) bool { return bytes.Equal(c.Raw, fresh.Raw) })
		})
	})
}

package agent

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// servedSource is what a workload's go-spiffe X509Source would hold: the
// SVID of one SPIFFE ID and the bundle, as the agent's cache serves them at
// the moment of each handshake.
type servedSource struct {
	a   *Agent
	sel []string
	id  spiffeid.ID
}

func (s servedSource) GetX509SVID() (*x509svid.SVID, error) {
	resp, _ := s.a.cache.X509SVIDResponse(s.sel)
	for _, sv := range resp.GetSvids() {
		if sv.GetSpiffeId() == s.id.String() {
			return x509svid.ParseRaw(sv.GetX509Svid(), sv.GetX509SvidKey())
		}
	}
	return nil, fmt.Errorf("no SVID for %s served", s.id)
}

func (s servedSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	resp, _ := s.a.cache.X509SVIDResponse(s.sel)
	if len(resp.GetSvids()) == 0 {
		return nil, fmt.Errorf("no bundle served")
	}
	return x509bundle.ParseRaw(td, resp.GetSvids()[0].GetBundle())
}

// handshake makes one mTLS connection over an in-memory pipe, the server
// and client each taking SVID and bundle from the agent as it is now, and
// echoes msg over it; it returns the open client end.
func handshake(t *testing.T, server, client servedSource, msg string) (net.Conn, error) {
	t.Helper()
	sc, cc := net.Pipe()
	srv := tls.Server(sc, tlsconfig.MTLSServerConfig(server, server, tlsconfig.AuthorizeID(client.id)))
	go func() {
		defer srv.Close()
		io.Copy(srv, srv)
	}()
	cli := tls.Client(cc, tlsconfig.MTLSClientConfig(client, client, tlsconfig.AuthorizeID(server.id)))
	if err := cli.Handshake(); err != nil {
		cli.Close()
		return nil, err
	}
	return cli, echoOver(cli, msg)
}

func echoOver(c net.Conn, msg string) error {
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("echoed %q, want %q", got, msg)
	}
	return nil
}

// TestMTLSAcrossCARotation (was the e2e test of that name): two workloads of
// the same agent keep talking mTLS across a CA rotation. One connection is
// held open throughout, and a new handshake every 250 ms of fake time
// succeeds before, during (new CA published) and after (new CA signing) the
// rotation, each side presenting the SVID the agent serves at that instant
// and checking its peer against the bundle served with it.
func TestMTLSAcrossCARotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, a, s := readyLoops(t, 10*time.Second, wireEntry("server", 1, "unix:uid:1"), wireEntry("client", 1, "unix:uid:1"))
		td := spiffeid.RequireTrustDomainFromString("example.org")
		server := servedSource{a: a, sel: s.sel, id: spiffeid.RequireFromPath(td, "/server")}
		client := servedSource{a: a, sel: s.sel, id: spiffeid.RequireFromPath(td, "/client")}
		long, err := handshake(t, server, client, "hello")
		if err != nil {
			t.Fatalf("first handshake: %v", err)
		}
		defer long.Close()
		issuers := map[string]bool{}
		step := func(phase string, d time.Duration) {
			t.Helper()
			for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
				synctest.Wait()
				c, err := handshake(t, server, client, "new")
				if err != nil {
					t.Fatalf("%s, %s: handshake: %v", phase, time.Now().Format(time.StampMilli), err)
				}
				c.Close()
				if err := echoOver(long, "long"); err != nil {
					t.Fatalf("%s: the long-lived connection broke: %v", phase, err)
				}
				if sv, err := server.GetX509SVID(); err == nil {
					issuers[string(sv.Certificates[0].AuthorityKeyId)] = true
				}
			}
		}
		step("before the rotation", 12*time.Second)
		f.rotateCA(t) // published
		step("next CA published", 10*time.Second)
		f.activateCA() // signs
		step("next CA signing", 15*time.Second)
		if len(issuers) != 2 {
			t.Errorf("the server's SVIDs came from %d CA(s), want both", len(issuers))
		}
	})
}

// Package e2e runs the real binaries (signer, agent) against a real swtpm
// over real sockets, and talks to the agent with go-spiffe's own client.
package e2e

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// env is one signer + agent deployment in a temp dir.
type env struct {
	dir, signerAddr                             string
	signerCfg, policyPath, bundlePath, agentCfg string
	socket                                      string
	signerAdmin                                 string // the signer's admin socket
	tpm                                         *swtpmtest.TPM
}

func newEnv(t *testing.T, tpm *swtpmtest.TPM, policy string) *env {
	t.Helper()
	d := shortDir(t)
	e := &env{
		dir: d, signerAddr: freePort(t), tpm: tpm,
		signerCfg: filepath.Join(d, "signer.hcl"), policyPath: filepath.Join(d, "policy.hcl"),
		bundlePath: filepath.Join(d, "bundle.pem"), agentCfg: filepath.Join(d, "agent.hcl"),
		socket: filepath.Join(d, "w.sock"), signerAdmin: filepath.Join(d, "signer-admin", "admin.sock"),
	}
	writeFile(t, e.signerCfg, fmt.Sprintf(`trust_domain   = "example.org"
listen_address = %q
policy_path    = "policy.hcl"
bundle_path    = "bundle.pem"
state_dir      = %q
admin_socket_path = %q
`, e.signerAddr, filepath.Join(d, "state"), e.signerAdmin))
	writeFile(t, e.policyPath, policy)
	writeFile(t, e.agentCfg, fmt.Sprintf(`trust_domain      = "example.org"
signer_address    = %q
trust_bundle_path = "bundle.pem"
socket_path       = %q
admin_socket_path = %q
tpm { socket = %q }
`, e.signerAddr, e.socket, filepath.Join(d, "admin", "a.sock"), tpm.Socket))
	return e
}

func (e *env) startSigner(t *testing.T) *proc {
	t.Helper()
	p := start(t, "lanyard-signer", "run", "--config", e.signerCfg)
	p.waitLog(t, 10*time.Second, "signer listening")
	return p
}

func (e *env) startAgent(t *testing.T) *proc {
	t.Helper()
	return start(t, "lanyard-agent", "run", "--config", e.agentCfg)
}

// fetchAs runs `lanyard-agent fetch x509` as another uid/gid, as a real
// separate process would call the agent.
func (e *env) fetchAs(t *testing.T, uid, gid uint32) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "lanyard-agent"), "fetch", "x509", "--socket", e.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func ekCAPolicy(tpm *swtpmtest.TPM, self string) string {
	return fmt.Sprintf(`node "lab" {
  ek_ca = [%q]
}
workload "server" {
  spiffe_id = "spiffe://example.org/server"
  nodes     = ["lab"]
  selectors = ["unix:uid:%[2]s"]
}
workload "client" {
  spiffe_id = "spiffe://example.org/client"
  nodes     = ["lab"]
  selectors = ["unix:uid:%[2]s"]
  hint      = "client"
}
workload "nobody" {
  spiffe_id = "spiffe://example.org/nobody"
  nodes     = ["lab"]
  selectors = ["unix:uid:65534"]
  dns_names = ["nobody.internal"]
}
`, tpm.EKCAPath, self)
}

func TestAgentServesX509SVIDs(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	self := fmt.Sprint(os.Getuid())
	e := newEnv(t, tpm, ekCAPolicy(tpm, self))
	e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 30*time.Second)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	x, err := client.FetchX509Context(ctx)
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	// The bundle the signer published on disk is the trust anchor a
	// relying party would use.
	published, err := x509bundle.Load(td, e.bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range x.SVIDs {
		ids = append(ids, s.ID.String())
		if _, _, err := x509svid.Verify(s.Certificates, published); err != nil {
			t.Errorf("%s does not verify against the published bundle: %v", s.ID, err)
		}
		if !publicKeyOf(s).Equal(s.Certificates[0].PublicKey) {
			t.Errorf("%s: private key does not match the certificate", s.ID)
		}
		if got := s.Certificates[0].NotAfter.Sub(s.Certificates[0].NotBefore); got < 59*time.Minute || got > 61*time.Minute {
			t.Errorf("%s: lifetime %v, want the default 1h", s.ID, got)
		}
	}
	if want := "spiffe://example.org/server spiffe://example.org/client"; strings.Join(ids, " ") != want {
		t.Errorf("SVIDs = %v, want %s (policy order)", ids, want)
	}
	if h := x.SVIDs[1].Hint; h != "client" {
		t.Errorf("hint = %q, want client", h)
	}

	t.Run("child under another uid gets that uid's identity", func(t *testing.T) {
		if os.Getuid() != 0 {
			t.Skip("needs root to run a child under uid 65534")
		}
		out, err := e.fetchAs(t, 65534, 65534)
		if err != nil {
			t.Fatalf("fetch as nobody: %v\n%s", err, out)
		}
		if !strings.Contains(out, "SPIFFE ID:  spiffe://example.org/nobody") || strings.Contains(out, "/server") {
			t.Errorf("fetch as nobody printed:\n%s", out)
		}
		if !strings.Contains(out, "DNS names:  nobody.internal") {
			t.Errorf("dns_names missing from nobody's SVID:\n%s", out)
		}
	})
	t.Run("uid without entry gets PermissionDenied", func(t *testing.T) {
		if os.Getuid() != 0 {
			t.Skip("needs root to run a child under uid 65533")
		}
		out, err := e.fetchAs(t, 65533, 65533)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("fetch as uid 65533: err=%v, want exit 1\n%s", err, out)
		}
		if !strings.Contains(out, "PermissionDenied") {
			t.Errorf("want PermissionDenied, got:\n%s", out)
		}
	})
	t.Run("missing security header is InvalidArgument", func(t *testing.T) {
		conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err == nil {
			_, err = stream.Recv()
		}
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("without header: %v, want InvalidArgument", err)
		}
	})
	t.Run("spiffetls peers complete mTLS", func(t *testing.T) {
		testMTLS(t, ctx, e.socket)
	})
}

func publicKeyOf(s *x509svid.SVID) interface{ Equal(crypto.PublicKey) bool } {
	return s.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
}

// testMTLS runs a spiffetls server holding the "server" SVID and a client
// holding the "client" SVID; each authorizes exactly the other's ID.
func testMTLS(t *testing.T, ctx context.Context, socket string) {
	serverID := spiffeid.RequireFromString("spiffe://example.org/server")
	clientID := spiffeid.RequireFromString("spiffe://example.org/client")
	pick := func(id spiffeid.ID) workloadapi.X509SourceOption {
		return workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID == id {
					return s
				}
			}
			return svids[0]
		})
	}
	addr := workloadapi.WithClientOptions(workloadapi.WithAddr("unix://" + socket))
	serverSrc, err := workloadapi.NewX509Source(ctx, addr, pick(serverID))
	if err != nil {
		t.Fatal(err)
	}
	defer serverSrc.Close()
	clientSrc, err := workloadapi.NewX509Source(ctx, addr, pick(clientID))
	if err != nil {
		t.Fatal(err)
	}
	defer clientSrc.Close()

	mtlsHello(t, ctx, serverSrc, clientSrc, serverID, clientID)
}

// mtlsHello runs a go-spiffe mTLS server on loopback with serverSrc's SVID,
// authorizing only clientID, which greets the peer it saw; a client with
// clientSrc, authorizing only serverID, dials it and reads the greeting.
// Each side must see exactly the other's ID.
func mtlsHello(t *testing.T, ctx context.Context, serverSrc, clientSrc *workloadapi.X509Source, serverID, clientID spiffeid.ID) {
	t.Helper()
	ln, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0",
		spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(clientID), serverSrc))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			got <- err
			return
		}
		defer conn.Close()
		peer, err := spiffetls.PeerIDFromConn(conn)
		if err != nil {
			got <- err
			return
		}
		if peer != clientID {
			got <- fmt.Errorf("server saw peer %s", peer)
			return
		}
		_, err = io.WriteString(conn, "hello "+peer.String())
		got <- err
	}()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", ln.Addr().String(),
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(serverID), clientSrc))
	if err != nil {
		t.Fatalf("mTLS dial from %s to %s: %v", clientID, serverID, err)
	}
	defer conn.Close()
	if peer, err := spiffetls.PeerIDFromConn(conn); err != nil || peer != serverID {
		t.Errorf("client saw server %v (%v)", peer, err)
	}
	want := "hello " + clientID.String()
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != want {
		t.Errorf("client read %q (%v), want %q", buf, err, want)
	}
	if err := <-got; err != nil {
		t.Errorf("server: %v", err)
	}
}

var ekHashRE = regexp.MustCompile(`EK SHA-256:\s+([0-9a-f]{64})`)

func TestTPMInfoAndPinnedEK(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	self := fmt.Sprint(os.Getuid())
	// First a policy that knows no TPM: the agent is refused but keeps
	// running and retrying.
	e := newEnv(t, tpm, fmt.Sprintf(`node "other" {
  ek_sha256 = ["%s"]
}
workload "w" {
  spiffe_id = "spiffe://example.org/w"
  nodes     = ["other"]
  selectors = ["unix:uid:%s"]
}
`, strings.Repeat("ab", 32), self))
	out, err := exec.Command(filepath.Join(bin, "lanyard-agent"), "tpm", "info", "--config", e.agentCfg).CombinedOutput()
	if err != nil {
		t.Fatalf("tpm info: %v\n%s", err, out)
	}
	m := ekHashRE.FindSubmatch(out)
	if m == nil {
		t.Fatalf("tpm info printed no EK SHA-256:\n%s", out)
	}
	ekHash := string(m[1])
	for _, want := range []string{"EK certificate:    present", "issuer:", "manufacturer:"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("tpm info lacks %q:\n%s", want, out)
		}
	}

	signer := e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "attestation failed")
	signer.waitLog(t, 5*time.Second, "attestation refused")
	if !strings.Contains(agent.out.String(), "not pinned") && !strings.Contains(agent.out.String(), "EK") {
		t.Errorf("agent's refusal does not say why:\n%s", agent.out.String())
	}
	if !agent.running() {
		t.Fatal("agent exited after a refused attestation; want retries")
	}
	if _, err := os.Stat(e.socket); err == nil {
		t.Error("agent serves the Workload API without an identity")
	}
	agent.stop(t)
	signer.stop(t)

	// Now pin the hash `tpm info` printed: the same TPM is accepted.
	writeFile(t, e.policyPath, fmt.Sprintf(`node "pinned" {
  ek_sha256 = ["%s"]
}
workload "w" {
  spiffe_id = "spiffe://example.org/w"
  nodes     = ["pinned"]
  selectors = ["unix:uid:%s"]
}
`, ekHash, self))
	e.startSigner(t)
	agent = e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")
	if !strings.Contains(agent.out.String(), "spiffe://example.org/lanyard/agent/tpm/"+ekHash) {
		t.Errorf("agent SVID is not named after the EK hash %s:\n%s", ekHash, agent.out.String())
	}
	x, err := workloadapi.FetchX509Context(ctxFor(t, 10*time.Second), workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	if got := x.DefaultSVID().ID.String(); got != "spiffe://example.org/w" {
		t.Errorf("SVID %s, want spiffe://example.org/w", got)
	}
}

func TestSignerUnreachableAtAgentStart(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ekCAPolicy(tpm, fmt.Sprint(os.Getuid())))
	// The agent needs a trust bundle to start; take it from a first signer
	// run, then stop that signer.
	s := e.startSigner(t)
	s.stop(t)

	agent := e.startAgent(t)
	agent.waitLog(t, 10*time.Second, "attestation failed")
	waitFor(t, 10*time.Second, "a second attempt", func() bool {
		return strings.Count(agent.out.String(), "attestation failed") >= 2
	})
	if !agent.running() {
		t.Fatal("agent exited while the signer was down")
	}
	if !strings.Contains(agent.out.String(), e.signerAddr) {
		t.Errorf("the error does not name the signer address %s", e.signerAddr)
	}
	// The signer comes up (with a new in-memory CA, so a new bundle file):
	// the agent's next retry reads the bundle file again and succeeds.
	e.startSigner(t)
	agent.waitLog(t, 40*time.Second, "agent ready")
	x, err := workloadapi.FetchX509Context(ctxFor(t, 10*time.Second), workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	if got := x.DefaultSVID().ID.String(); got != "spiffe://example.org/server" {
		t.Errorf("SVID %s, want spiffe://example.org/server", got)
	}
}

func TestPolicyCheck(t *testing.T) {
	t.Parallel()
	d := shortDir(t)
	cfg := filepath.Join(d, "signer.hcl")
	writeFile(t, cfg, `trust_domain = "example.org"
policy_path  = "policy.hcl"
bundle_path  = "bundle.pem"
`)
	writeFile(t, filepath.Join(d, "policy.hcl"), `node "lab" {
  ek_sha256 = ["`+strings.Repeat("0", 64)+`"]
}
workload "w" {
  spiffe_id = "spiffe://example.org/w"
  nodes     = ["lab", "nope"]
  selectors = ["unix:uid:1000"]
}
`)
	out, err := exec.Command(filepath.Join(bin, "lanyard-signer"), "policy", "check", "--config", cfg).CombinedOutput()
	if err == nil {
		t.Fatalf("policy check accepted a policy naming an unknown node:\n%s", out)
	}
	if want := "policy.hcl:6: "; !strings.Contains(string(out), want) || !strings.Contains(string(out), "nope") {
		t.Errorf("policy check output %q lacks %q naming the unknown node", out, want)
	}
	writeFile(t, filepath.Join(d, "policy.hcl"), `node "lab" {
  ek_sha256 = ["`+strings.Repeat("0", 64)+`"]
}
`)
	if out, err := exec.Command(filepath.Join(bin, "lanyard-signer"), "policy", "check", "--config", cfg).CombinedOutput(); err != nil {
		t.Errorf("valid policy refused: %v\n%s", err, out)
	}
}

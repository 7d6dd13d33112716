package e2e

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
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
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ttlPolicy gives this test process one identity per name, its X.509-SVIDs
// with the given TTL.
func ttlPolicy(tpm *swtpmtest.TPM, ttl string, names ...string) string {
	return selfPolicy(tpm, ttl, "", names...)
}

// selfPolicy gives this test process one identity per name: X.509-SVIDs
// with x509TTL and, when jwtTTL is set, JWT-SVIDs with jwtTTL.
func selfPolicy(tpm *swtpmtest.TPM, x509TTL, jwtTTL string, names ...string) string {
	p := fmt.Sprintf("node \"lab\" {\n  ek_ca = [%q]\n}\n", tpm.EKCAPath)
	for _, n := range names {
		jwt := ""
		if jwtTTL != "" {
			jwt = fmt.Sprintf("  jwt_ttl   = %q\n", jwtTTL)
		}
		p += fmt.Sprintf(`workload %q {
  spiffe_id = "spiffe://example.org/%[1]s"
  nodes     = ["lab"]
  selectors = ["unix:uid:%d"]
  x509_ttl  = %q
%s}
`, n, os.Getuid(), x509TTL, jwt)
	}
	return p
}

// watcher samples an X509Source and records every distinct SVID serial,
// and every moment it held an expired SVID or none.
type watcher struct {
	mu      sync.Mutex
	serials []string
	svids   map[string]*x509svid.SVID
	bad     []string
}

func watch(ctx context.Context, t *testing.T, src *workloadapi.X509Source) *watcher {
	w := &watcher{svids: map[string]*x509svid.SVID{}}
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			now := time.Now()
			s, err := src.GetX509SVID()
			w.mu.Lock()
			switch {
			case err != nil:
				w.bad = append(w.bad, fmt.Sprintf("%s: no SVID: %v", now.Format(time.StampMilli), err))
			case !now.Before(s.Certificates[0].NotAfter):
				w.bad = append(w.bad, fmt.Sprintf("%s: SVID %x expired at %s", now.Format(time.StampMilli),
					s.Certificates[0].SerialNumber, s.Certificates[0].NotAfter.Format(time.StampMilli)))
			default:
				serial := s.Certificates[0].SerialNumber.Text(16)
				if _, ok := w.svids[serial]; !ok {
					w.svids[serial] = s
					w.serials = append(w.serials, serial)
				}
			}
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *watcher) snapshot() (serials, bad []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.serials...), append([]string(nil), w.bad...)
}

func newSource(t *testing.T, ctx context.Context, socket string) *workloadapi.X509Source {
	t.Helper()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
	if err != nil {
		t.Fatalf("NewX509Source: %v", err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

func TestShortLivedSVIDsRotate(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "10s", "short"))
	e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 60*time.Second)
	w := watch(ctx, t, newSource(t, ctx, e.socket))
	time.Sleep(25 * time.Second) // the property under test takes wall time: 3 rotations of a 10 s SVID
	serials, bad := w.snapshot()
	if len(bad) > 0 {
		t.Errorf("the source held no valid SVID at %d moments, first: %s", len(bad), bad[0])
	}
	if len(serials) < 4 {
		t.Errorf("saw %d distinct SVIDs in 25 s, want at least 4 (3 rotations): %v", len(serials), serials)
	}
}

func TestSignerOutageIsInvisible(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "30s", "steady"))
	signer := e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 90*time.Second)
	src := newSource(t, ctx, e.socket)
	before, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	w := watch(ctx, t, src)

	signer.stop(t)
	time.Sleep(10 * time.Second) // the outage
	restarted := time.Now()
	e.startSigner(t)

	// A new SVID, signed after the restart, reaches the workload within
	// the agent's backoff cap (30 s) plus a margin.
	waitFor(t, 40*time.Second, "an SVID issued after the signer restart", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, s := range w.svids {
			if s.Certificates[0].NotAfter.After(restarted.Add(25 * time.Second)) {
				return true
			}
		}
		return false
	})
	serials, bad := w.snapshot()
	if len(bad) > 0 {
		t.Errorf("the outage was visible: %d moments without a valid SVID, first: %s", len(bad), bad[0])
	}
	if len(serials) < 2 {
		t.Errorf("saw %d SVIDs across the outage, want a renewal", len(serials))
	}
	// The SVID issued before the restart still verifies against the
	// bundle the restarted signer published.
	published, err := x509bundle.Load(td, e.bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(before.Certificates, published, x509svid.WithTime(before.Certificates[0].NotBefore.Add(15*time.Second))); err != nil {
		t.Errorf("an SVID from before the restart does not verify against the new bundle: %v", err)
	}
}

func TestNeverServesExpiredSVID(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "10s", "brief"))
	signer := e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 60*time.Second)
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx := metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(sctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	signer.stop(t) // and it stays down past every SVID's expiry

	var last time.Time
	for {
		resp, err := stream.Recv()
		if err != nil {
			// Still entitled, only without a valid SVID: Unavailable, which
			// clients retry, not PermissionDenied.
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("stream ended with %v, want Unavailable once the SVID expired", err)
			}
			if now := time.Now(); now.Before(last) {
				t.Errorf("Unavailable at %v, before the last SVID expired at %v", now, last)
			}
			break
		}
		now := time.Now()
		for _, s := range resp.GetSvids() {
			certs, err := x509.ParseCertificates(s.GetX509Svid())
			if err != nil {
				t.Fatal(err)
			}
			if !now.Before(certs[0].NotAfter) {
				t.Fatalf("served an SVID that expired at %v (now %v)", certs[0].NotAfter, now)
			}
			last = certs[0].NotAfter
		}
	}
	_, err = workloadapi.FetchX509SVID(ctxFor(t, 5*time.Second), workloadapi.WithAddr("unix://"+e.socket))
	if status.Code(err) != codes.Unavailable && !strings.Contains(fmt.Sprint(err), "Unavailable") {
		t.Errorf("a new fetch after expiry: %v, want Unavailable", err)
	}
}

func TestMTLSAcrossCARotation(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "10s", "server", "client"))
	// A one-minute CA rotates at half-life (30 s), the next one published
	// 10 s before. Lifetimes must fit in half the CA's.
	cfg, err := os.ReadFile(e.signerCfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.signerCfg, string(cfg)+"ca_ttl = \"1m\"\nagent_ttl = \"30s\"\nx509_max_ttl = \"30s\"\n")
	e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 90*time.Second)
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
	addr := workloadapi.WithClientOptions(workloadapi.WithAddr("unix://" + e.socket))
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
	ln, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0", spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(clientID), serverSrc))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); io.Copy(conn, conn) }()
		}
	}()

	// One connection held open across the rotation, and a new handshake
	// every 250 ms, for 45 s: past the activation of the second CA.
	long, err := spiffetls.DialWithMode(ctx, "tcp", ln.Addr().String(), spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(serverID), clientSrc))
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	issuers := map[string]bool{}
	deadline := time.Now().Add(45 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		conn, err := spiffetls.DialWithMode(ctx, "tcp", ln.Addr().String(), spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(serverID), clientSrc))
		if err != nil {
			t.Fatalf("handshake %d failed: %v", i, err)
		}
		echo(t, conn, fmt.Sprintf("new %d", i))
		conn.Close()
		echo(t, long, fmt.Sprintf("long %d", i))
		if s, err := serverSrc.GetX509SVID(); err == nil {
			issuers[string(s.Certificates[0].AuthorityKeyId)] = true
		}
		time.Sleep(250 * time.Millisecond)
	}
	if len(issuers) < 2 {
		t.Errorf("the server's SVIDs came from %d CA(s) in 45 s, want a CA rotation", len(issuers))
	}
}

func echo(t *testing.T, conn io.ReadWriter, msg string) {
	t.Helper()
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, buf, err)
	}
}

package e2e

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
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

// TestShortLivedSVIDsRotate is the one rotation test that runs on the
// wall clock, end to end: a workload's X509Source sees a 10 s SVID
// replaced twice by the real agent and signer, and never holds an expired
// one or none. How the loops behave through outages, expiry, CA and JWT
// key rotations, backoff and pacing is asserted to the instant on fake
// time in the agent package (agent/loops_test.go: TestLoopsSignerOutageIsInvisible,
// TestLoopsNeverServeExpiredSVID, TestLoopsAcrossCARotation; agent/jwt_test.go:
// TestJWTAcrossKeyRotation) and in the signer's (signer/authority_test.go
// TestCARotationOverlap, signer/jwt_test.go TestJWTKeyRotation).
func TestShortLivedSVIDsRotate(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "10s", "short"))
	e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 40*time.Second)
	w := watch(ctx, t, newSource(t, ctx, e.socket))
	// Renewed at half-life: the second rotation lands about 10 s in.
	waitFor(t, 20*time.Second, "two rotations of a 10 s SVID", func() bool {
		serials, _ := w.snapshot()
		return len(serials) >= 3
	})
	if _, bad := w.snapshot(); len(bad) > 0 {
		t.Errorf("the source held no valid SVID at %d moments, first: %s", len(bad), bad[0])
	}
}

package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// TestPolicyEditNeverRelabels, end to end:
// entry "root" (this process's uid) is edited to a new SPIFFE ID and
// selector unix:uid:65534. A uid-65534 stream that was already open must
// receive the new entry's SVID, signed for the new revision, and never the
// certificate (and key) signed for "root", under either label.
func TestPolicyEditNeverRelabels(t *testing.T) {
	t.Parallel()
	if os.Getuid() != 0 {
		t.Skip("needs root: runs a workload as uid 65534")
	}
	tpm := swtpmtest.Start(t)
	policy := func(rootID, rootUID string) string {
		return fmt.Sprintf(`node "lab" {
  ek_ca = [%q]
}
workload "base" {
  spiffe_id = "spiffe://example.org/base"
  nodes     = ["lab"]
  selectors = ["unix:uid:65534"]
}
workload "root" {
  spiffe_id = %q
  nodes     = ["lab"]
  selectors = ["unix:uid:%s"]
}
`, tpm.EKCAPath, rootID, rootUID)
	}
	e := newEnv(t, tpm, policy("spiffe://example.org/root", fmt.Sprint(os.Getuid())))
	signer := e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")
	signer.waitLog(t, 10*time.Second, `spiffe_id=spiffe://example.org/root`)

	// The uid-65534 workload: one stream, open before the edit.
	cmd := helperCmd(t, "watch-x509", 65534, 65534, e.socket)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("helper stderr: %s", stderr.String())
		}
	})
	var mu sync.Mutex
	var pushes [][]pushedSVID
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var p []pushedSVID
			if json.Unmarshal(sc.Bytes(), &p) == nil {
				mu.Lock()
				pushes = append(pushes, p)
				mu.Unlock()
			}
		}
	}()
	seen := func(id string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, p := range pushes {
			if slices.ContainsFunc(p, func(s pushedSVID) bool { return s.Label == id || s.CertID == id }) {
				return true
			}
		}
		return false
	}
	waitFor(t, 10*time.Second, "uid 65534's first SVID", func() bool { return seen("spiffe://example.org/base") })

	writeFile(t, e.policyPath, policy("spiffe://example.org/moved", "65534"))
	waitFor(t, 10*time.Second, "the edited entry's SVID on the open stream", func() bool { return seen("spiffe://example.org/moved") })

	// Every serial the signer ever signed for the old revision.
	var rootSerials []string
	re := regexp.MustCompile(`x509-svid signed: .*entry=root .*spiffe_id=spiffe://example.org/root .*serial=([0-9a-f]+)`)
	for _, m := range re.FindAllStringSubmatch(signer.out.String(), -1) {
		rootSerials = append(rootSerials, m[1])
	}
	if len(rootSerials) == 0 {
		t.Fatalf("found no serial signed for spiffe://example.org/root in the signer log:\n%s", signer.out.String())
	}
	mu.Lock()
	defer mu.Unlock()
	for i, p := range pushes {
		for _, s := range p {
			if s.Label != s.CertID {
				t.Errorf("push %d: SVID labelled %s carries a certificate of %s", i, s.Label, s.CertID)
			}
			if slices.Contains(rootSerials, s.Serial) {
				t.Errorf("push %d: uid 65534 received serial %s, signed for the old revision (spiffe://example.org/root)", i, s.Serial)
			}
		}
	}
	if t.Failed() {
		t.Logf("pushes: %v", pushes)
		t.Logf("signer log:\n%s", strings.TrimSpace(signer.out.String()))
	}
}

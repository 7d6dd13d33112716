package e2e

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// withSignerTPM gives e's signer its own swtpm: its CA and JWT keys are
// sealed to it (key_storage "tpm", the default with a tpm block).
func (e *env) withSignerTPM(t *testing.T, tpm *swtpmtest.TPM) {
	t.Helper()
	cfg, err := os.ReadFile(e.signerCfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.signerCfg, string(cfg)+fmt.Sprintf("tpm { socket = %q }\n", tpm.Socket))
}

// TestSignerRestartWithSealedKeys: kill -9 the signer and start it again,
// 20 times.
// Its keys are sealed to its own TPM, so the bundle is byte-identical, and
// the agent, never given a file, reconnects and renews; an SVID signed
// before the restart and one signed after both verify against the bundle
// the agent holds, and a JWT-SVID minted after the restart validates on
// the agent that was connected before it. Then the state dir is moved to
// another TPM: the signer refuses to start (exit 78) and changes nothing.
func TestSignerRestartWithSealedKeys(t *testing.T) {
	t.Parallel()
	agentTPM, signerTPM := swtpmtest.Start(t), swtpmtest.Start(t)
	e := newEnv(t, agentTPM, selfPolicy(agentTPM, "10s", "30s", "svc"))
	e.withSignerTPM(t, signerTPM)
	signer := e.startSigner(t)
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")
	ctx := ctxFor(t, 60*time.Second)
	addr := workloadapi.WithAddr("unix://" + e.socket)
	before, err := workloadapi.FetchX509Context(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := os.ReadFile(e.bundlePath)
	if err != nil {
		t.Fatal(err)
	}

	signer.cmd.Process.Kill() // kill -9: nothing is flushed or saved
	<-signer.done
	signer = e.startSigner(t)
	if !strings.Contains(signer.out.String(), "signing keys unsealed") {
		t.Errorf("the restarted signer did not unseal its keys:\n%s", signer.out)
	}
	if got, _ := os.ReadFile(e.bundlePath); !bytes.Equal(got, bundle) {
		t.Errorf("bundle.pem changed across the restart")
	}
	// 19 more crash-restarts: not one CA or JWT key is added.
	for i := range 19 {
		signer.cmd.Process.Kill()
		<-signer.done
		signer = e.startSigner(t)
		if got, _ := os.ReadFile(e.bundlePath); !bytes.Equal(got, bundle) {
			t.Fatalf("bundle.pem changed at restart %d", i+2)
		}
	}

	// The agent renews (10 s SVIDs) through the restarted signer.
	oldSerial := before.DefaultSVID().Certificates[0].SerialNumber
	var after *workloadapi.X509Context
	waitFor(t, 20*time.Second, "an SVID signed after the restart", func() bool {
		x, err := workloadapi.FetchX509Context(ctx, addr)
		if err != nil || x.DefaultSVID().Certificates[0].SerialNumber.Cmp(oldSerial) == 0 {
			return false
		}
		after = x
		return x.DefaultSVID().Certificates[0].NotBefore.After(time.Now().Add(-15 * time.Second))
	})
	for name, x := range map[string]*workloadapi.X509Context{"before": before, "after": after} {
		if _, _, err := x509svid.Verify(x.DefaultSVID().Certificates, after.Bundles); err != nil {
			t.Errorf("the SVID signed %s the restart does not verify against the agent's bundle: %v", name, err)
		}
	}
	jwtClient, err := workloadapi.New(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer jwtClient.Close()
	tok, err := jwtClient.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "peer"})
	if err != nil {
		t.Fatalf("JWT-SVID after the restart: %v", err)
	}
	if _, err := jwtClient.ValidateJWTSVID(ctx, tok.Marshal(), "peer"); err != nil {
		t.Errorf("a JWT-SVID minted after the restart does not validate on the agent connected before it: %v", err)
	}

	// The state dir on another host (another TPM): refused, untouched.
	signer.stop(t)
	state := filepath.Join(e.dir, "state")
	snapshot := dirDigest(t, state)
	other := swtpmtest.Start(t)
	cfg, _ := os.ReadFile(e.signerCfg)
	moved := filepath.Join(e.dir, "moved.hcl")
	writeFile(t, moved, strings.Replace(string(cfg), signerTPM.Socket, other.Socket, 1))
	out, err := exec.Command(filepath.Join(bin, "lanyard-signer"), "run", "--config", moved).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 78 || !strings.Contains(string(out), "cannot unseal") {
		t.Errorf("signer on another TPM: %v, want exit 78 naming the unseal failure\n%s", err, out)
	}
	if got := dirDigest(t, state); got != snapshot {
		t.Error("the refused start changed the state dir")
	}
	if got, _ := os.ReadFile(e.bundlePath); !bytes.Equal(got, bundle) {
		t.Error("the refused start changed bundle.pem")
	}
}

// dirDigest hashes every file's name and content under dir.
func dirDigest(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		fmt.Fprintf(h, "%s\x00%d\x00", path, len(b))
		h.Write(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

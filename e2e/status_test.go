package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// agentCmd runs a lanyard-agent subcommand and returns its output and exit
// code.
func agentCmd(t *testing.T, cred *syscall.Credential, args ...string) (string, int) {
	t.Helper()
	return binCmd(t, "lanyard-agent", cred, args...)
}

// binCmd runs one of the built binaries, as cred when not nil, and returns
// its output and exit code.
func binCmd(t *testing.T, name string, cred *syscall.Credential, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, name), args...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	}
	t.Fatalf("run %s %v: %v", name, args, err)
	return "", -1
}

func TestStatus(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ekCAPolicy(tpm, fmt.Sprint(os.Getuid())))
	admin := filepath.Join(e.dir, "admin", "a.sock")

	if out, code := agentCmd(t, nil, "status", "--admin-socket", admin); code != 2 || !strings.Contains(out, "agent not running") {
		t.Errorf("status with no agent: exit %d, want 2 and 'agent not running':\n%s", code, out)
	}

	signer := e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	out, code := agentCmd(t, nil, "status", "--admin-socket", admin)
	if code != 0 {
		t.Fatalf("status of a healthy agent: exit %d\n%s", code, out)
	}
	lines := strings.Split(out, "\n")
	if !strings.HasPrefix(lines[0], "Health:") || !strings.Contains(lines[0], "healthy") {
		t.Errorf("first line should say healthy:\n%s", out)
	}
	for _, want := range []string{"spiffe://example.org/lanyard/agent/tpm/", "connected", "spiffe://example.org/server", "ENTRY"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}

	out, code = agentCmd(t, nil, "status", "--json", "--config", e.agentCfg)
	var r struct {
		Health string `json:"health"`
		Agent  struct {
			SPIFFEID string `json:"spiffe_id"`
			EKSHA256 string `json:"ek_sha256"`
		} `json:"agent"`
		Signer struct {
			Connected bool `json:"connected"`
		} `json:"signer"`
		Bundle []struct {
			NotAfter time.Time `json:"not_after"`
		} `json:"bundle"`
		Entries []struct {
			ID       string     `json:"id"`
			SPIFFEID string     `json:"spiffe_id"`
			Serial   string     `json:"serial"`
			NotAfter *time.Time `json:"not_after"`
			RenewAt  *time.Time `json:"renew_at"`
		} `json:"entries"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || code != 0 {
		t.Fatalf("status --json: exit %d, %v\n%s", code, err, out)
	}
	if r.Health != "healthy" || !r.Signer.Connected || len(r.Agent.EKSHA256) != 64 || len(r.Bundle) == 0 || len(r.Entries) != 3 {
		t.Errorf("status --json = %+v", r)
	}
	for _, en := range r.Entries {
		if en.ID == "server" && (en.Serial == "" || en.NotAfter == nil || en.RenewAt == nil || !en.RenewAt.Before(*en.NotAfter)) {
			t.Errorf("entry %+v lacks its SVID facts", en)
		}
	}
	if _, code := agentCmd(t, nil, "healthcheck", "--admin-socket", admin); code != 0 {
		t.Errorf("healthcheck exit %d, want 0", code)
	}

	if os.Getuid() == 0 {
		nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
		if out, code := agentCmd(t, nobody, "status", "--admin-socket", admin); code != 4 || !strings.Contains(out, "permission denied: the admin socket is root-only; run as root") {
			t.Errorf("status as nobody: exit %d, want 4 and the root-only message\n%s", code, out)
		}
		// Even with the permissions loosened, the peer uid check refuses.
		os.Chmod(filepath.Dir(admin), 0o755)
		os.Chmod(admin, 0o666)
		if out, code := agentCmd(t, nobody, "status", "--admin-socket", admin); code != 4 || !strings.Contains(out, "root-only") {
			t.Errorf("status as nobody on a 0666 socket: exit %d, want 4 and the root-only message\n%s", code, out)
		}
		agent.waitLog(t, 5*time.Second, "admin connection refused: not root")
	}

	signer.stop(t)
	waitFor(t, 10*time.Second, "status to turn degraded", func() bool {
		_, code := agentCmd(t, nil, "healthcheck", "--admin-socket", admin)
		return code == 1
	})
	out, _ = agentCmd(t, nil, "status", "--admin-socket", admin)
	if !strings.Contains(strings.Split(out, "\n")[0], "signer unreachable") {
		t.Errorf("degraded status does not say why in its first line:\n%s", out)
	}
}

func TestStatusNotAttested(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, fmt.Sprintf(`node "other" {
  ek_sha256 = ["%s"]
}
`, strings.Repeat("cd", 32)))
	e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "attestation failed")
	out, code := agentCmd(t, nil, "status", "--config", e.agentCfg)
	if code != 2 || !strings.Contains(strings.Split(out, "\n")[0], "not attested") {
		t.Errorf("status of an unattested agent: exit %d, want 2 and 'not attested' first:\n%s", code, out)
	}
	// The signer answers, and refuses: its reason comes first, with the EK
	// SHA-256 to pin, which the TPM line shows too.
	ek := regexp.MustCompile(`ek_sha256=([0-9a-f]{64})`).FindStringSubmatch(agent.out.String())
	if ek == nil {
		t.Fatalf("no ek_sha256 in the agent log:\n%s", agent.out)
	}
	first := strings.Split(out, "\n")[0]
	if !strings.HasPrefix(first, "Health:   unhealthy: attestation refused by the signer: ") || !strings.Contains(first, "EK is not pinned") ||
		!strings.Contains(first, "pin EK SHA-256 "+ek[1]) || strings.Contains(first, "signer unreachable") {
		t.Errorf("first line does not name the signer's refusal and the EK to pin:\n%s", out)
	}
	if !strings.Contains(out, "EK SHA-256 "+ek[1]) {
		t.Errorf("the TPM line lacks the EK SHA-256 of an unattested agent:\n%s", out)
	}
}

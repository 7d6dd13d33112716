package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// sleeper starts `sleep 60` as cred (nil: as this test) and returns it;
// the test kills it at the end.
func sleeper(t *testing.T, cred *syscall.Credential) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sleep: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// TestExplain asks the running agent why real processes do or do not get
// identities: one that matches two entries, one that matches another, and
// one that matches none, with what each entry lacks.
func TestExplain(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	self := fmt.Sprint(os.Getuid())
	e := newEnv(t, tpm, ekCAPolicy(tpm, self))
	e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	type explained struct {
		PID       int      `json:"pid"`
		UID       int      `json:"uid"`
		Selectors []string `json:"selectors"`
		Synced    bool     `json:"synced"`
		Matching  []struct {
			ID       string `json:"id"`
			SPIFFEID string `json:"spiffe_id"`
			Serial   string `json:"serial"`
		} `json:"matching"`
		NotMatching []struct {
			ID      string   `json:"id"`
			Missing []string `json:"missing"`
		} `json:"not_matching"`
	}
	explainJSON := func(t *testing.T, pid int) (explained, int) {
		t.Helper()
		out, code := agentCmd(t, nil, "explain", fmt.Sprint(pid), "--json", "--config", e.agentCfg)
		var ex explained
		if err := json.Unmarshal([]byte(out), &ex); err != nil {
			t.Fatalf("explain %d --json: exit %d, %v\n%s", pid, code, err, out)
		}
		return ex, code
	}
	ids := func(ex explained) (match, notMatch string) {
		var m, n []string
		for _, e := range ex.Matching {
			m = append(m, e.ID)
		}
		for _, e := range ex.NotMatching {
			n = append(n, e.ID+"<"+strings.Join(e.Missing, ",")+">")
		}
		return strings.Join(m, " "), strings.Join(n, " ")
	}

	mine := sleeper(t, nil)
	ex, code := explainJSON(t, mine.Process.Pid)
	m, n := ids(ex)
	if code != 0 || m != "server client" || n != "nobody<unix:uid:65534>" || !ex.Synced || ex.PID != mine.Process.Pid {
		t.Errorf("explain of a process of this uid: exit %d, matching %q, not matching %q", code, m, n)
	}
	for _, en := range ex.Matching {
		if en.Serial == "" {
			t.Errorf("matching entry %s has no SVID serial", en.ID)
		}
	}
	hasPath := slices.Contains(ex.Selectors, "unix:path:/usr/bin/sleep") || slices.Contains(ex.Selectors, "unix:path:/bin/sleep")
	if !slices.Contains(ex.Selectors, "unix:uid:"+self) || !hasPath {
		t.Errorf("selectors of sleep lack its uid or path: %v", ex.Selectors)
	}

	out, code := agentCmd(t, nil, "explain", "--config", e.agentCfg, fmt.Sprint(mine.Process.Pid))
	if code != 0 || !strings.Contains(out, "Verdict: gets spiffe://example.org/server, spiffe://example.org/client") || !strings.Contains(out, "lacks unix:uid:65534") {
		t.Errorf("explain (human) of a matching process: exit %d\n%s", code, out)
	}

	if os.Getuid() == 0 {
		nobody := sleeper(t, &syscall.Credential{Uid: 65534, Gid: 65534})
		ex, code := explainJSON(t, nobody.Process.Pid)
		if m, n := ids(ex); code != 0 || m != "nobody" || n != "server<unix:uid:0> client<unix:uid:0>" || ex.UID != 65534 {
			t.Errorf("explain of a uid 65534 process: exit %d, matching %q, not matching %q", code, m, n)
		}

		stranger := sleeper(t, &syscall.Credential{Uid: 4242, Gid: 4242})
		out, code := agentCmd(t, nil, "explain", fmt.Sprint(stranger.Process.Pid), "--config", e.agentCfg)
		if code != 1 || !strings.Contains(out, "Verdict: no identity") || !strings.Contains(out, "unix:uid:4242") ||
			!strings.Contains(out, "nobody") || !strings.Contains(out, "lacks unix:uid:65534") {
			t.Errorf("explain of a process no entry matches: exit %d, want 1\n%s", code, out)
		}
	}

	// A PID that names no process, and one that is not a PID.
	done := exec.Command("true")
	if err := done.Run(); err != nil {
		t.Fatal(err)
	}
	if out, code := agentCmd(t, nil, "explain", fmt.Sprint(done.Process.Pid), "--config", e.agentCfg); code != 2 || !strings.Contains(out, "no such process") || strings.Contains(out, "404") {
		t.Errorf("explain of an exited PID: exit %d, want 2 and 'no such process'\n%s", code, out)
	}
	if out, code := agentCmd(t, nil, "explain", "web", "--config", e.agentCfg); code != 2 || !strings.Contains(out, `"web" is not a process ID`) {
		t.Errorf("explain web: exit %d, want 2\n%s", code, out)
	}
}

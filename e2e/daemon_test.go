package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// notifySocket listens like systemd on a NOTIFY_SOCKET and returns the
// environment that points a daemon at it (with a 1s watchdog), and every
// datagram received.
func notifySocket(t *testing.T) ([]string, <-chan string) {
	t.Helper()
	path := filepath.Join(shortDir(t), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	msgs := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return []string{"NOTIFY_SOCKET=" + path, "WATCHDOG_USEC=1000000", "WATCHDOG_PID="}, msgs
}

// awaitNotify returns the first datagram containing want, within d. Each
// datagram read on the way is passed to seen (when not nil).
func awaitNotify(t *testing.T, msgs <-chan string, d time.Duration, want string, seen func(string)) string {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("notify socket closed before %q", want)
			}
			if seen != nil {
				seen(m)
			}
			if strings.Contains(m, want) {
				return m
			}
		case <-deadline:
			t.Fatalf("no %q notification within %v", want, d)
		}
	}
}

// TestAgentNotify checks the agent's side of systemd's notify protocol:
// READY=1 comes only once a Workload API fetch works, STATUS= says why it
// is not ready, WATCHDOG=1 pings keep coming, STOPPING=1 on SIGTERM.
func TestAgentNotify(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ekCAPolicy(tpm, fmt.Sprint(os.Getuid())))
	// The agent needs a bundle file to start; a first signer run writes
	// it. With the signer down, the agent cannot become ready.
	e.startSigner(t).stop(t)
	env, msgs := notifySocket(t)
	agent := startEnv(t, env, "lanyard-agent", "run", "--config", e.agentCfg)

	var statuses []string
	noReady := func(m string) {
		if strings.Contains(m, "READY=1") {
			t.Fatalf("READY=1 while the signer is down: %q", m)
		}
		if strings.Contains(m, "STATUS=") {
			statuses = append(statuses, m)
		}
	}
	awaitNotify(t, msgs, 20*time.Second, "STATUS=not attested: signer "+e.signerAddr+" unreachable", noReady)
	for range 2 {
		awaitNotify(t, msgs, 5*time.Second, "WATCHDOG=1", noReady)
	}
	// The first line is sent at once, before the first attempt could fail.
	if first := statuses[0]; !strings.Contains(first, "STATUS=starting") && !strings.Contains(first, "STATUS=attesting to the signer at "+e.signerAddr) {
		t.Errorf("first STATUS = %q, want starting or attesting", first)
	}

	signerUp := time.Now()
	e.startSigner(t)
	ready := awaitNotify(t, msgs, 40*time.Second, "READY=1", nil)
	t.Logf("signer start to agent READY=1: %v", time.Since(signerUp))
	// At the moment READY=1 arrives, a workload must get its SVID.
	x, err := workloadapi.FetchX509Context(ctxFor(t, 5*time.Second), workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatalf("fetch right after READY=1: %v", err)
	}
	if len(x.SVIDs) == 0 {
		t.Error("no SVID right after READY=1")
	}
	if !strings.Contains(ready, "STATUS=healthy: serving 3 entries") {
		t.Errorf("READY=1 notification = %q, want STATUS=healthy: serving 3 entries", ready)
	}
	awaitNotify(t, msgs, 5*time.Second, "WATCHDOG=1", nil)
	// The restarted signer has a new CA, which the agent learnt from its
	// trust bundle file.
	agent.waitLog(t, 5*time.Second, "trust bundle file reloaded")

	agent.stop(t)
	awaitNotify(t, msgs, 5*time.Second, "STOPPING=1", nil)
}

// TestSignerNotify: READY=1 once agents can connect, a STATUS= line that
// shows a refused policy edit, WATCHDOG=1 pings and STOPPING=1.
func TestSignerNotify(t *testing.T) {
	t.Parallel()
	d := shortDir(t)
	addr := freePort(t)
	cfg := filepath.Join(d, "signer.hcl")
	writeFile(t, cfg, fmt.Sprintf("trust_domain = \"example.org\"\nlisten_address = %q\npolicy_path = \"policy.hcl\"\nbundle_path = \"bundle.pem\"\nstate_dir = \"state\"\nadmin_socket_path = \"admin/admin.sock\"\n", addr))
	good := `node "lab" {
  ek_sha256 = ["` + strings.Repeat("0", 64) + `"]
}
`
	writeFile(t, filepath.Join(d, "policy.hcl"), good)
	env, msgs := notifySocket(t)
	signer := startEnv(t, env, "lanyard-signer", "run", "--config", cfg)

	ready := awaitNotify(t, msgs, 20*time.Second, "READY=1", nil)
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial the signer right after READY=1: %v", err)
	}
	c.Close()
	if !strings.Contains(ready, "policy with 1 nodes and 0 workloads") {
		t.Errorf("READY=1 notification = %q, want the policy counts", ready)
	}
	awaitNotify(t, msgs, 5*time.Second, "WATCHDOG=1", nil)

	// systemctl reload: the unchanged policy is read again.
	if err := signer.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	signer.waitLog(t, 5*time.Second, "policy reloaded")

	writeFile(t, filepath.Join(d, "policy.hcl"), good+"workload {\n")
	awaitNotify(t, msgs, 10*time.Second, "STATUS=policy edit refused, last good policy in force: "+filepath.Join(d, "policy.hcl")+":4:", nil)
	signer.stop(t)
	awaitNotify(t, msgs, 5*time.Second, "STOPPING=1", nil)
}

// TestPolicyReloadEndToEnd edits the signer's policy under a running agent:
// a valid edit reaches the workload promptly, an invalid one is logged with
// file:line and changes nothing, and an editor-style rename-replace works.
func TestPolicyReloadEndToEnd(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	self := fmt.Sprint(os.Getuid())
	base := ekCAPolicy(tpm, self)
	e := newEnv(t, tpm, base)
	signer := e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	entry := func(name string) string {
		return fmt.Sprintf("workload %q {\n  spiffe_id = \"spiffe://example.org/%s\"\n  nodes     = [\"lab\"]\n  selectors = [\"unix:uid:%s\"]\n}\n", name, name, self)
	}
	ids := func() []string {
		x, err := workloadapi.FetchX509Context(ctxFor(t, 5*time.Second), workloadapi.WithAddr("unix://"+e.socket))
		if err != nil {
			t.Fatalf("fetch: %v", err)
		}
		var out []string
		for _, s := range x.SVIDs {
			out = append(out, s.ID.String())
		}
		slices.Sort(out)
		return out
	}
	// await polls until the fetched IDs are want, and returns how long
	// that took from edit.
	await := func(edit time.Time, want ...string) time.Duration {
		t.Helper()
		slices.Sort(want)
		var got []string
		for time.Since(edit) < 10*time.Second {
			if got = ids(); slices.Equal(got, want) {
				return time.Since(edit)
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("after 10s the workload gets %v, want %v", got, want)
		return 0
	}
	server, client := "spiffe://example.org/server", "spiffe://example.org/client"
	if got := ids(); !slices.Equal(got, []string{client, server}) {
		t.Fatalf("before any edit: %v", got)
	}

	t.Run("valid edit", func(t *testing.T) {
		edit := time.Now()
		writeFile(t, e.policyPath, base+entry("added"))
		took := await(edit, server, client, "spiffe://example.org/added")
		t.Logf("edit to SVID fetchable: %v", took)
		if took > 3*time.Second {
			t.Errorf("a policy edit took %v to reach the workload, want well under 3s", took)
		}
		signer.waitLog(t, 5*time.Second, "policy reloaded")
	})
	t.Run("invalid edit", func(t *testing.T) {
		lines := strings.Count(base, "\n")
		// Line lines+3 names a node block that does not exist.
		writeFile(t, e.policyPath, base+strings.Replace(entry("broken"), `["lab"]`, `["nope"]`, 1))
		want := fmt.Sprintf("%s:%d: ", e.policyPath, lines+3)
		signer.waitLog(t, 10*time.Second, want)
		if !strings.Contains(signer.out.String(), "policy reload failed") {
			t.Errorf("signer log lacks 'policy reload failed'")
		}
		// The last good policy stays: the workload still gets what it had.
		if got := ids(); !slices.Equal(got, []string{"spiffe://example.org/added", client, server}) {
			t.Errorf("after an invalid edit the workload gets %v", got)
		}
	})
	t.Run("rename-replace edit", func(t *testing.T) {
		tmp := filepath.Join(e.dir, ".policy.hcl.swp")
		writeFile(t, tmp, base+entry("renamed"))
		edit := time.Now()
		if err := os.Rename(tmp, e.policyPath); err != nil {
			t.Fatal(err)
		}
		took := await(edit, server, client, "spiffe://example.org/renamed")
		t.Logf("rename-replace to SVID fetchable: %v", took)
	})
}

// TestRunRefusesInvalidConfig: an invalid file stops the binary before it
// starts anything, with one message naming file and line, and exit 78
// (EX_CONFIG, which the units keep systemd from restarting on).
func TestRunRefusesInvalidConfig(t *testing.T) {
	t.Parallel()
	d := shortDir(t)
	writeFile(t, filepath.Join(d, "policy.hcl"), "node \"lab\" {\n  ek_sha256 = [\"zz\"]\n}\n")
	writeFile(t, filepath.Join(d, "good-policy.hcl"), "")
	tests := []struct {
		name, binary, config string
		want                 string // file:line: message, in the output
	}{
		{"agent unknown key", "lanyard-agent", "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:1\"\ntrust_bundle_path = \"b.pem\"\nsocket_paht = \"/run/w.sock\"\ntpm { device = \"/dev/tpmrm0\" }\n",
			"agent unknown key.hcl:4: Unsupported argument"},
		{"agent wrong type", "lanyard-agent", "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:1\"\ntrust_bundle_path = [\"b.pem\"]\ntpm { device = \"/dev/tpmrm0\" }\n",
			"agent wrong type.hcl:3: "},
		{"agent bad value", "lanyard-agent", "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:1\"\ntrust_bundle_path = \"b.pem\"\nlog_level = \"loud\"\ntpm { device = \"/dev/tpmrm0\" }\n",
			"agent bad value.hcl:4: "},
		{"agent missing trust bundle", "lanyard-agent", "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:1\"\ntrust_bundle_path = \"nope.pem\"\ntpm { device = \"/dev/tpmrm0\" }\n",
			"agent missing trust bundle.hcl:3: trust_bundle_path: "},
		{"agent trust bundle not PEM", "lanyard-agent", "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:1\"\ntrust_bundle_path = \"policy.hcl\"\ntpm { device = \"/dev/tpmrm0\" }\n",
			"agent trust bundle not PEM.hcl:3: trust_bundle_path: "},
		{"signer unknown key", "lanyard-signer", "trust_domain = \"example.org\"\npolicy_path = \"good-policy.hcl\"\nbundle_path = \"b.pem\"\nca_tll = \"1h\"\n",
			"signer unknown key.hcl:4: Unsupported argument"},
		{"signer wrong type", "lanyard-signer", "trust_domain = \"example.org\"\npolicy_path = \"good-policy.hcl\"\nbundle_path = \"b.pem\"\nca_ttl = 3600\n",
			"signer wrong type.hcl:4: "},
		{"signer bad value", "lanyard-signer", "trust_domain = \"example.org\"\npolicy_path = \"good-policy.hcl\"\nbundle_path = \"b.pem\"\nlisten_address = \"nowhere\"\n",
			"signer bad value.hcl:4: "},
		{"signer invalid policy", "lanyard-signer", "trust_domain = \"example.org\"\npolicy_path = \"policy.hcl\"\nbundle_path = \"b.pem\"\nstate_dir = \"state\"\n",
			"policy.hcl:2: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := filepath.Join(d, tt.name+".hcl")
			writeFile(t, cfg, tt.config)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, filepath.Join(bin, tt.binary), "run", "--config", cfg).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 78 {
				t.Fatalf("%s run: %v, want exit status 78\n%s", tt.binary, err, out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Errorf("output lacks %q:\n%s", tt.want, out)
			}
			// One message, no log lines: nothing was started.
			if strings.Contains(string(out), "[INFO]") || strings.Count(string(out), "\n") > 3 {
				t.Errorf("want one short message, got:\n%s", out)
			}
		})
	}
}

//go:build cgo

package signer_test

// BenchmarkSignerScale: many simulated agents hold real Sync streams (mTLS
// over loopback) to a real signer in a child process; a policy edit that
// touches every node is timed until the last agent has it.
//
// Agents and TPMs: the go-tpm-tools simulator is a process-wide singleton
// and making an EK, an AK and a key in it costs ~50 ms, so the run uses
// LANYARD_SCALE_TPMS distinct simulated TPMs (fixed seeds, so distinct EKs
// and distinct agent IDs) and opens LANYARD_SCALE_AGENTS/TPMS Sync streams
// per TPM, each on its own TLS connection with its own handshake signed by
// that TPM's key, while its simulator is open. The signer keeps no state
// per stream beyond the stream, and computes each stream's entries on
// every change, so a stream costs it the same whether or not its agent ID
// is shared. Set LANYARD_SCALE_TPMS = LANYARD_SCALE_AGENTS for one TPM per
// agent (about a minute per 1,000 on 2 cores).
//
// After the edits the signer, its keys sealed to a swtpm, is killed with
// SIGKILL and started again on the same address and state dir: each
// agent redials, attests again and reopens its streams, and the re-sync
// is timed; then a few nodes are revoked and timed until their streams end.

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// scaleTimeout bounds each step: attestation, a stream's first
	// message, an edit reaching every stream.
	scaleTimeout = 60 * time.Second
	// scaleEdits is how many policy edits are timed.
	scaleEdits = 5
	// scaleWorkloads is how many entries every node has before the edits.
	scaleWorkloads = 10
	// scaleRevokes is how many node revocations are timed.
	scaleRevokes = 10
)

var scaleTD = spiffeid.RequireTrustDomainFromString("example.org")

func envInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// scalePolicy pins every EK in one node block "fleet", with
// scaleWorkloads entries plus one per edit made so far: each edit changes
// what every agent may serve.
func scalePolicy(eks []string, edits int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node \"fleet\" {\n  ek_sha256 = [\n")
	for _, ek := range eks {
		fmt.Fprintf(&b, "    %q,\n", ek)
	}
	b.WriteString("  ]\n}\n")
	for i := range scaleWorkloads + edits {
		fmt.Fprintf(&b, "workload \"w%d\" {\n  spiffe_id = \"spiffe://example.org/w%d\"\n  nodes = [\"fleet\"]\n  selectors = [\"unix:uid:%d\"]\n}\n", i, i, 1000+i)
	}
	return b.String()
}

// scaleSigner is the child signer process.
type scaleSigner struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines *bufio.Scanner
	addr  string
	trust *x509bundle.Bundle
	// ready is when the child announced it serves (its clock, the same
	// host's); started is how long from exec to that announcement.
	ready   time.Time
	started time.Duration
}

// writeScaleConfig writes the child's config: its CA and JWT keys sealed
// to the swtpm at tpmSocket, as in a real deployment, so a restart keeps
// them.
func writeScaleConfig(b *testing.B, dir, tpmSocket string) {
	b.Helper()
	conf := "trust_domain = \"example.org\"\npolicy_path = \"policy.hcl\"\nbundle_path = \"bundle.pem\"\nstate_dir = \"state\"\nlog_level = \"error\"\nadmin_socket_path = \"admin/admin.sock\"\n" +
		fmt.Sprintf("tpm {\n  socket = %q\n}\n", tpmSocket) +
		// Many streams share each TPM's agent ID here (see the file comment):
		// lift the per-agent Sync cap that guards a real fleet.
		"limits {\n  max_sync_streams_per_agent = 1048576\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "signer.hcl"), []byte(conf), 0o600); err != nil {
		b.Fatal(err)
	}
}

// startScaleSigner starts the child on the config in dir, listening on
// addr, or on a free loopback port when addr is empty.
func startScaleSigner(b *testing.B, dir, addr string) *scaleSigner {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestScaleSignerChild$", "-test.bench=^$")
	cmd.Env = append(os.Environ(), scaleChildEnv+"="+filepath.Join(dir, "signer.hcl"), scaleChildAddrEnv+"="+addr)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatalf("start signer child: %v", err)
	}
	s := &scaleSigner{cmd: cmd, stdin: stdin, lines: bufio.NewScanner(stdout)}
	b.Cleanup(func() {
		stdin.Close() // the child stops on EOF
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	line, err := s.line()
	s.started = time.Since(t0)
	f := strings.Fields(line)
	if err != nil || len(f) != 3 || f[0] != "addr" {
		// A failing child prints "--- FAIL" first, then why.
		for range 10 {
			more, err := s.line()
			if err != nil {
				break
			}
			line += "\n" + more
		}
		b.Fatalf("signer child: %s %v", line, err)
	}
	ns, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		b.Fatalf("signer child: %q: %v", line, err)
	}
	s.addr, s.ready = f[1], time.Unix(0, ns)
	if s.trust, err = x509bundle.Load(scaleTD, filepath.Join(dir, "bundle.pem")); err != nil {
		b.Fatalf("load bundle: %v", err)
	}
	return s
}

// kill ends the child with SIGKILL, as a crash would, and waits for it.
func (s *scaleSigner) kill() error {
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill signer child: %w", err)
	}
	_ = s.cmd.Wait() // "signal: killed"
	return nil
}

// line reads the child's next line of stdout, within scaleTimeout.
func (s *scaleSigner) line() (string, error) {
	got := make(chan bool, 1)
	go func() { got <- s.lines.Scan() }()
	select {
	case ok := <-got:
		if !ok {
			return "", fmt.Errorf("signer child ended: %v", s.lines.Err())
		}
		return s.lines.Text(), nil
	case <-time.After(scaleTimeout):
		return "", fmt.Errorf("signer child silent for %v", scaleTimeout)
	}
}

// reload makes the child read its policy file again.
func (s *scaleSigner) reload() error { return s.command("reload") }

// revoke revokes the node of the EK as `node revoke` does.
func (s *scaleSigner) revoke(ek string) error { return s.command("revoke " + ek) }

// revokeToken revokes a JWT-SVID by its jti.
func (s *scaleSigner) revokeToken(jti string) error { return s.command("tokenrevoke " + jti) }

// command sends the child one line and waits for its "ok".
func (s *scaleSigner) command(c string) error {
	if _, err := io.WriteString(s.stdin, c+"\n"); err != nil {
		return err
	}
	line, err := s.line()
	if err != nil {
		return err
	}
	if line != "ok" {
		return fmt.Errorf("%s: %s", c, line)
	}
	return nil
}

// usage returns the child's RSS in MiB and its user+sys CPU time.
func (s *scaleSigner) usage(b *testing.B) (float64, time.Duration) {
	b.Helper()
	pid := s.cmd.Process.Pid
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	var rss float64
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			rss = kb / 1024
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name (which may hold spaces): utime and
	// stime are the 14th and 15th of the whole line, in clock ticks
	// (USER_HZ, 100 on Linux).
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return rss, time.Duration(ut+st) * 10 * time.Millisecond
}

// Package swtpmtest runs a real software TPM (swtpm) for tests: a TPM 2.0
// that serves the raw command stream on a Unix socket, as `swtpm socket
// --server type=unixio` does in production, and holds an RSA EK whose
// certificate (NV index 0x01c00002) chains to a throwaway local CA.
//
// The work is done by scripts/swtpm.sh, the same script `make demo` uses, so
// tests and the demo exercise one provisioning path.
package swtpmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ErrNoRepoRoot is returned by RepoRoot when no go.mod is found above the
// working directory.
var ErrNoRepoRoot = errors.New("no go.mod found above the working directory")

// requiredTools are the programs scripts/swtpm.sh runs, from the Debian
// packages swtpm, swtpm-tools and (through swtpm-tools) gnutls-bin.
var requiredTools = []string{"bash", "swtpm", "swtpm_setup", "swtpm_cert", "certtool"}

// maxSocketPath is sun_path's 108 bytes less the terminating NUL.
const maxSocketPath = 107

// scriptTimeout bounds each call of scripts/swtpm.sh; provisioning takes
// about 1.5 s on a 2-core machine, far more under -race with tests running
// in parallel.
const scriptTimeout = 2 * time.Minute

// TPM is a running swtpm provisioned with an EK certificate, for tests.
// All of it lives in Dir, which Start removes when the test ends.
type TPM struct {
	// Dir holds the TPM's state, its manufacturer CA and its sockets.
	Dir string
	// Socket is the Unix socket carrying the raw TPM 2.0 command stream.
	Socket string
	// EKCAPath is a PEM file with the CA certificates (root first, then
	// the issuer) that the EK certificate chains to: what a policy's
	// ek_ca names.
	EKCAPath string
	// EKCertPath is the RSA EK certificate in PEM; the TPM holds the same
	// certificate, DER-encoded, in NV index 0x01c00002.
	EKCertPath string

	script string // scripts/swtpm.sh
}

// Start provisions and starts a swtpm in a fresh short temporary directory,
// and stops and removes it when the test ends. Without swtpm installed it
// skips the test, naming what is missing; with CI=true in the environment
// it fails instead, so CI cannot pass by skipping the TPM tests.
func Start(t testing.TB) *TPM {
	t.Helper()
	if missing := missingTools(); len(missing) > 0 {
		msg := fmt.Sprintf("swtpm is not installed: %s not found in PATH (run make swtpm-deps, or apt-get install -y swtpm swtpm-tools)",
			strings.Join(missing, ", "))
		if inCI() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	script := filepath.Join(root, "scripts", "swtpm.sh")

	dir, err := shortTempDir()
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	t.Cleanup(func() {
		// SIGKILL, not the script's SIGTERM: swtpm takes over a second to
		// notice a SIGTERM, and the state it would save is deleted next.
		if err := killSwtpm(dir); err != nil {
			t.Errorf("swtpmtest: %v", err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("swtpmtest: remove %s: %v", dir, err)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	caPath, err := runScript(ctx, script, "provision", dir)
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	sock, err := runScript(ctx, script, "start", dir)
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	return &TPM{
		Dir:        dir,
		Socket:     sock,
		EKCAPath:   caPath,
		EKCertPath: filepath.Join(dir, "ek.pem"),
		script:     script,
	}
}

// Kill ends the swtpm at once (SIGKILL), as a crash would, and returns
// once it is gone. Its state stays in Dir, and the socket file stays
// behind with nobody listening, as after a real crash.
func (p *TPM) Kill(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(p.Dir, "swtpm.pid")); err != nil {
		t.Fatalf("swtpmtest: no swtpm running: %v", err)
	}
	if err := killSwtpm(p.Dir); err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
}

// killSwtpm SIGKILLs the swtpm serving dir, if one runs, and waits until it
// is gone.
func killSwtpm(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "swtpm.pid"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil // never started, or provisioning failed
	}
	if err != nil {
		return fmt.Errorf("read pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	// The pid file may outlive its swtpm (Kill already ran, or a crash):
	// signal only a process that is still that swtpm.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte("dir="+dir+"/state")) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill swtpm %d: %w", pid, err)
	}
	// swtpm --daemon is not our child: wait for /proc to let it go (or
	// show a zombie, which nobody may reap in a container).
	for deadline := time.Now().Add(10 * time.Second); ; {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return nil
		}
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("swtpm %d still alive 10s after SIGKILL", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Restart starts the swtpm again, on the same socket and the same state:
// the same TPM, with the same EK, but none of the objects and sessions
// its clients had loaded.
func (p *TPM) Restart(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	sock, err := runScript(ctx, p.script, "start", p.Dir)
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	if sock != p.Socket {
		t.Fatalf("swtpmtest: restarted on %s, want %s", sock, p.Socket)
	}
}

// RepoRoot returns the directory of the nearest go.mod at or above the
// working directory, which `go test` sets to the package under test: that
// is how a test in any package finds scripts/.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find repo root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", ErrNoRepoRoot
		}
		dir = parent
	}
}

func missingTools() []string {
	var missing []string
	for _, tool := range requiredTools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	return missing
}

func inCI() bool {
	ci, err := strconv.ParseBool(os.Getenv("CI"))
	return err == nil && ci
}

// shortTempDir makes a directory whose socket paths fit in sun_path. $TMPDIR
// can be long (t.TempDir under it is longer still), so fall back to /tmp.
func shortTempDir() (string, error) {
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		return "", fmt.Errorf("create temp dir: %w", err)
	}
	if len(filepath.Join(dir, "ctrl.sock")) <= maxSocketPath {
		return dir, nil
	}
	if err := os.Remove(dir); err != nil {
		return "", fmt.Errorf("remove long temp dir: %w", err)
	}
	dir, err = os.MkdirTemp("/tmp", "ly")
	if err != nil {
		return "", fmt.Errorf("create temp dir in /tmp: %w", err)
	}
	return dir, nil
}

// runScript runs one verb of scripts/swtpm.sh and returns the last line it
// printed (the path it reports); its stderr goes into the error.
func runScript(ctx context.Context, script, verb, dir string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script, verb, dir)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// swtpm --daemon keeps nothing of ours open, but a stuck child must
	// not hold the test past the timeout either.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("swtpm.sh %s %s: %w: %s", verb, dir, err, strings.TrimSpace(stderr.String()))
	}
	out := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(out, '\n'); i >= 0 {
		out = out[i+1:]
	}
	return out, nil
}

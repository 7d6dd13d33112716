package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/lanyard-dev/lanyard/internal/testport"
	"github.com/lanyard-dev/lanyard/internal/testwait"
)

// bin holds the binaries built once for all tests, in a directory every
// local user can read and execute (tests run children as other uids).
var bin string

func TestMain(m *testing.M) {
	runHelper()
	dir, err := os.MkdirTemp("", "lybin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	cmd := exec.Command("go", "build", "-tags", "grpcnotrace", "-o", dir+"/", "../cmd/lanyard-agent", "../cmd/lanyard-signer")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build binaries: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	if err := copyTestBinary(dir); err != nil {
		fmt.Fprintf(os.Stderr, "copy test binary: %v\n", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	bin = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a running binary whose output is kept for assertions.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// syncBuffer is a buffer safe for the process writer and the test.
type syncBuffer = testlog.Buffer

// start runs a binary until the test ends (SIGTERM, then wait).
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	return startEnv(t, nil, name, args...)
}

// startEnv is start with extra environment variables ("K=V").
func startEnv(t *testing.T, env []string, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(filepath.Join(bin, name), args...), out: &syncBuffer{}, done: make(chan struct{})}
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			t.Logf("%s output:\n%s", name, p.out.String())
		}
	})
	return p
}

// stop sends SIGTERM and waits for a clean exit.
func (p *proc) stop(t *testing.T) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		t.Errorf("%s did not stop within 10s of SIGINT", p.cmd.Path)
	}
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, d, what, cond)
}

// waitLog waits for a line containing s in p's output.
func (p *proc) waitLog(t *testing.T, d time.Duration, s string) {
	t.Helper()
	waitFor(t, d, fmt.Sprintf("%q in %s output", s, filepath.Base(p.cmd.Path)), func() bool {
		return strings.Contains(p.out.String(), s)
	})
}

// freePort returns a loopback address nothing listens on, that a daemon
// restarted on it can bind again (testport.Free).
func freePort(t *testing.T) string { return testport.Free(t) }

// shortDir is a temp dir whose paths fit in sun_path, readable by all
// (children run under other uids must reach the socket in it).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// ctx is a test-bounded context.
func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

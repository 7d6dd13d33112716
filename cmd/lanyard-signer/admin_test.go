package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/adminsock"
	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/lanyard-dev/lanyard/signer"
)

// serveAdmin runs a signer's admin handler on a root-only socket under a
// directory 65534 may enter, until the test ends; it returns the socket
// path and the admin log.
func serveAdmin(t *testing.T) (string, *testlog.Buffer) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the admin socket answers root only: run as root (CI does)")
	}
	base, err := os.MkdirTemp("", "lys")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	pol := filepath.Join(base, "policy.hcl")
	if err := os.WriteFile(pol, []byte("node \"lab\" {\n  ek_sha256 = [\""+strings.Repeat("ab", 32)+"\"]\n}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := signer.ParseConfig([]byte(`trust_domain = "example.org"
policy_path = "policy.hcl"
bundle_path = "bundle.pem"
state_dir = "state"
`), filepath.Join(base, "signer.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := signer.New(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	logs := &testlog.Buffer{}
	path := filepath.Join(base, "admin", "admin.sock")
	ln, err := adminsock.Listen(path, hclog.New(&hclog.LoggerOptions{Output: logs, JSONFormat: true}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() { done <- adminsock.Serve(ctx, ln, path, s.AdminHandler(), ready) }()
	<-ready
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("admin Serve: %v", err)
		}
	})
	return path, logs
}

func runCmd(f func([]string, *bytes.Buffer, *bytes.Buffer) int, args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := f(args, &out, &errb)
	return code, out.String(), errb.String()
}

func nodeF(args []string, o, e *bytes.Buffer) int    { return nodeCmd(args, o, e) }
func statusF(args []string, o, e *bytes.Buffer) int  { return statusCmd(args, o, e) }
func policyF(args []string, o, e *bytes.Buffer) int  { return policyCmd(args, o, e) }
func tokenF(args []string, o, e *bytes.Buffer) int   { return tokenCmd(args, o, e) }
func replicaF(args []string, o, e *bytes.Buffer) int { return replicaCmd(args, o, e) }

// TestAdminCommands: help exits 0, bad usage 2, the signer's refusals 1
// with its precise error, an absent signer 69; status and node list read
// the running signer.
func TestAdminCommands(t *testing.T) {
	sock, _ := serveAdmin(t)
	ek := strings.Repeat("cd", 32)
	good := filepath.Join(t.TempDir(), "p.hcl")
	bad := filepath.Join(t.TempDir(), "bad.hcl")
	os.WriteFile(good, []byte("node \"lab\" {\n  ek_sha256 = [\""+ek+"\"]\n}\n"), 0o644)
	os.WriteFile(bad, []byte("node \"lab\" {\n}\nworkload \"w\" {\n  nodes = [\"nope\"]\n}\n"), 0o644)
	tests := []struct {
		name      string
		f         func([]string, *bytes.Buffer, *bytes.Buffer) int
		args      []string
		code      int
		out, errs string
	}{
		{"node help", nodeF, []string{"--help"}, 0, "lanyard-signer node <command>", ""},
		{"revoke help", nodeF, []string{"revoke", "--help"}, 0, "-reason", ""},
		{"list help", nodeF, []string{"list", "-h"}, 0, "-json", ""},
		{"status help", statusF, []string{"--help"}, 0, "-admin-socket", ""},
		{"no node command", nodeF, nil, 2, "", "usage"},
		{"unknown node command", nodeF, []string{"purge"}, 2, "", `unknown node command "purge"`},
		{"revoke without node", nodeF, []string{"revoke", "--admin-socket", sock, "--reason", "x"}, 2, "", "usage: lanyard-signer node revoke"},
		{"revoke unknown node", nodeF, []string{"revoke", ek, "--admin-socket", sock, "--reason", "gone"}, 1, "", "node revoke: " + ek + ": unknown node"},
		{"revoke empty reason", nodeF, []string{"revoke", "--admin-socket", sock, ek}, 1, "", "bad revocation reason: empty"},
		{"revoke control character", nodeF, []string{"revoke", ek, "--admin-socket", sock, "--reason", "a\tb"}, 1, "", "control character U+0009"},
		{"unrevoke bad name", nodeF, []string{"unrevoke", "spiffe://example.org/web", "--admin-socket", sock}, 1, "", "not an EK SHA-256"},
		{"list empty", nodeF, []string{"list", "--admin-socket", sock}, 0, "(no agent attested yet)", ""},
		{"list json", nodeF, []string{"list", "--json", "--admin-socket", sock}, 0, "[]", ""},
		{"status", statusF, []string{"--admin-socket", sock}, 0, "Bundle:   sequence 1, 1 CAs", ""},
		{"status json", statusF, []string{"--json", "--admin-socket", sock}, 0, `"agents_known": 0`, ""},
		{"policy help", policyF, []string{"--help"}, 0, "lanyard-signer policy <command>", ""},
		{"unknown policy command", policyF, []string{"edit"}, 2, "", `unknown policy command "edit"`},
		{"policy apply without file", policyF, []string{"apply", "--admin-socket", sock}, 2, "", "usage: lanyard-signer policy apply FILE"},
		{"policy apply invalid file", policyF, []string{"apply", bad, "--admin-socket", sock}, 1, "", bad + ":4: nodes: no node block named \"nope\""},
		{"policy apply missing file", policyF, []string{"apply", bad + ".nope", "--admin-socket", sock}, 1, "", "no such file"},
		{"policy apply on a lone signer", policyF, []string{"apply", good, "--admin-socket", sock}, 1, "", "this signer has no etcd block: it is not part of a tier: edit policy_path instead"},
		{"policy show on a lone signer", policyF, []string{"show", "--admin-socket", sock}, 0, "a lone signer: no revisions", ""},
		{"replica help", replicaF, []string{"-h"}, 0, "lanyard-signer replica <command>", ""},
		{"replica list on a lone signer", replicaF, []string{"list", "--admin-socket", sock}, 1, "", "replica list: this signer has no etcd block"},
		{"replica forget without name", replicaF, []string{"forget", "--admin-socket", sock}, 2, "", "usage: lanyard-signer replica forget NAME"},
		{"token help", tokenF, []string{"--help"}, 0, "lanyard-signer token <command>", ""},
		{"token revoke help", tokenF, []string{"revoke", "-h"}, 0, "-spiffe-id", ""},
		{"unknown token command", tokenF, []string{"forget"}, 2, "", `unknown token command "forget"`},
		{"token list empty", tokenF, []string{"list", "--admin-socket", sock}, 0, "(no token revoked)", ""},
		{"token revoke without jti", tokenF, []string{"revoke", "--admin-socket", sock, "--reason", "x"}, 2, "", "usage: lanyard-signer token revoke (JTI | --spiffe-id ID)"},
		{"token revoke jti and ID", tokenF, []string{"revoke", "abc", "--spiffe-id", "spiffe://example.org/w", "--admin-socket", sock, "--reason", "x"}, 2, "", `token revoke: unexpected argument "abc"`},
		{"token revoke empty reason", tokenF, []string{"revoke", "abc", "--admin-socket", sock}, 1, "", "token revoke: bad revocation reason: empty"},
		{"token revoke bad jti", tokenF, []string{"revoke", "a+b", "--admin-socket", sock, "--reason", "x"}, 1, "", "token revoke: bad token revocation: jti \"a+b\": byte 1 is not base64url"},
		{"token revoke foreign ID", tokenF, []string{"revoke", "--spiffe-id", "spiffe://other.org/w", "--admin-socket", sock, "--reason", "x"}, 1, "", "is not in trust domain example.org"},
		{"token revoke jti", tokenF, []string{"revoke", "tok1", "--admin-socket", sock, "--reason", "leaked"}, 0, "revoked token tok1: leaked (kept until ", ""},
		{"token revoke jti twice", tokenF, []string{"revoke", "tok1", "--admin-socket", sock, "--reason", "again"}, 1, "", "token already revoked: jti tok1 (reason: leaked)"},
		{"token revoke ID", tokenF, []string{"revoke", "--spiffe-id", "spiffe://example.org/bot", "--reason", "compromised", "--admin-socket", sock}, 0, "revoked every token of spiffe://example.org/bot issued before ", ""},
		{"token list", tokenF, []string{"list", "--admin-socket", sock}, 0, "\ntoken tok1  ", ""},
		{"token list json", tokenF, []string{"list", "--json", "--admin-socket", sock}, 0, `"spiffe_id": "spiffe://example.org/bot"`, ""},
		{"signer not running", statusF, []string{"--admin-socket", filepath.Join(t.TempDir(), "none.sock")}, 69, "", "signer not reachable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out, errs := runCmd(tt.f, tt.args...)
			if code != tt.code || !strings.Contains(out, tt.out) || !strings.Contains(errs, tt.errs) {
				t.Errorf("exit %d, stdout %q, stderr %q; want %d, %q, %q", code, out, errs, tt.code, tt.out, tt.errs)
			}
		})
	}
}

// TestAdminNotRoot runs the real binary as uid 65534: refused at the
// directory (EACCES), and, with the directory and socket opened up, by
// the signer's peer check; both exit 77 with the same message.
func TestAdminNotRoot(t *testing.T) {
	sock, logs := serveAdmin(t)
	bin := filepath.Join(filepath.Dir(filepath.Dir(sock)), "lanyard-signer")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	run := func() (int, string) {
		cmd := exec.Command(bin, "node", "list", "--admin-socket", sock)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0, string(out)
	}
	if code, out := run(); code != exitNotRoot || !strings.Contains(out, errNotRoot.Error()) {
		t.Errorf("as uid 65534: exit %d, %q; want %d, %q", code, out, exitNotRoot, errNotRoot.Error())
	}
	// Loosened permissions: the peer check still refuses.
	os.Chmod(filepath.Dir(sock), 0o755)
	os.Chmod(sock, 0o666)
	if code, out := run(); code != exitNotRoot || !strings.Contains(out, errNotRoot.Error()) {
		t.Errorf("as uid 65534 past the file modes: exit %d, %q; want %d, %q", code, out, exitNotRoot, errNotRoot.Error())
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), `"uid":65534`) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "admin connection refused: not root") {
		t.Errorf("no refusal logged: %s", logs)
	}
}

package attestor

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func self() Process {
	return Process{PID: int32(os.Getpid()), UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}
}

// wantNames returns the name selectors the host's user database gives uid
// and gid, so the expectations hold on machines without those names.
func wantNames(t *testing.T, uid, gid uint32) []string {
	t.Helper()
	var out []string
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		out = append(out, "unix:user:"+u.Username)
	}
	if g, err := user.LookupGroupId(strconv.FormatUint(uint64(gid), 10)); err == nil {
		out = append(out, "unix:group:"+g.Name)
	}
	return out
}

func TestUnixAttestSelf(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("os.Executable: %v", err)
	}
	p := self()
	want := append([]string{
		"unix:uid:" + strconv.Itoa(os.Getuid()),
		"unix:gid:" + strconv.Itoa(os.Getgid()),
		"unix:path:" + exe,
	}, wantNames(t, p.UID, p.GID)...)
	slices.Sort(want)

	got, err := Unix{}.Attest(context.Background(), p)
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("selectors (-want +got):\n%s", diff)
	}
}

// TestUnixAttestFakeProc drives the /proc reading through ProcRoot, where
// each case's exe link can be anything.
func TestUnixAttestFakeProc(t *testing.T) {
	root := t.TempDir()
	link := func(pid int, target string) {
		dir := filepath.Join(root, strconv.Itoa(pid))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, filepath.Join(dir, "exe")); err != nil {
			t.Fatal(err)
		}
	}
	link(10, "/opt/web/bin/web")
	link(11, "/opt/web/bin/web (deleted)")

	tests := []struct {
		name    string
		pid     int32
		want    []string
		wantErr error
		errText string
	}{
		{
			name: "path from exe link",
			pid:  10,
			want: []string{"unix:gid:4242", "unix:path:/opt/web/bin/web", "unix:uid:4242"},
		},
		{
			name:    "deleted exe",
			pid:     11,
			wantErr: ErrExeDeleted,
			errText: "attest pid 11: read exe: /opt/web/bin/web: executable was deleted",
		},
		{
			name:    "no such process",
			pid:     12,
			wantErr: fs.ErrNotExist,
			errText: "attest pid 12: read exe:",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// 4242 has no name on any sane test host: the name selectors
			// are covered by TestUnixAttestSelf.
			if _, err := user.LookupId("4242"); err == nil {
				t.Skip("uid 4242 has a name on this host; the expectations assume it has none")
			}
			if _, err := user.LookupGroupId("4242"); err == nil {
				t.Skip("gid 4242 has a name on this host; the expectations assume it has none")
			}
			got, err := Unix{ProcRoot: root}.Attest(context.Background(), Process{PID: tc.pid, UID: 4242, GID: 4242})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("error = %v, want %v", err, tc.wantErr)
				}
				if !strings.HasPrefix(err.Error(), tc.errText) {
					t.Errorf("error text = %q, want prefix %q", err, tc.errText)
				}
				return
			}
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("selectors (-want +got):\n%s", diff)
			}
		})
	}
}

func TestUnixAttestErrors(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()

	tests := []struct {
		name    string
		ctx     context.Context
		pid     int32
		wantErr error
	}{
		{name: "nonexistent pid", ctx: context.Background(), pid: unusedPID(t), wantErr: fs.ErrNotExist},
		{name: "canceled context", ctx: canceled, pid: int32(os.Getpid()), wantErr: context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Unix{}.Attest(tc.ctx, Process{PID: tc.pid})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if want := "pid " + strconv.Itoa(int(tc.pid)); !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not name %q", err, want)
			}
		})
	}
}

// unusedPID returns pid_max, which the kernel never hands out (PIDs stay
// below it).
func unusedPID(t *testing.T) int32 {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatalf("read pid_max: %v", err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 32)
	if err != nil {
		t.Fatalf("parse pid_max: %v", err)
	}
	return int32(n)
}

// startSleep starts `sleep 5` from path and stops it when the test ends.
// Start returns only after execve succeeded, so /proc/<pid>/exe already
// names the new binary.
func startSleep(t *testing.T, path string, cred *syscall.Credential) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(path, "5")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", path, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

func sleepPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("sleep")
	if err != nil {
		t.Skipf("no sleep binary on PATH: %v", err)
	}
	// /proc/<pid>/exe holds the resolved path (/bin may link to /usr/bin).
	abs, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatalf("resolve %s: %v", p, err)
	}
	return abs
}

func TestUnixAttestOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("starting a process as uid 65534 needs root")
	}
	sleep := sleepPath(t)
	cmd := startSleep(t, sleep, &syscall.Credential{Uid: 65534, Gid: 65534})

	got, err := Unix{}.Attest(context.Background(), Process{PID: int32(cmd.Process.Pid), UID: 65534, GID: 65534})
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	want := append([]string{"unix:gid:65534", "unix:path:" + sleep, "unix:uid:65534"}, wantNames(t, 65534, 65534)...)
	slices.Sort(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("selectors (-want +got):\n%s", diff)
	}
}

func TestUnixAttestDeletedExe(t *testing.T) {
	src, err := os.ReadFile(sleepPath(t))
	if err != nil {
		t.Fatalf("read sleep: %v", err)
	}
	copyPath := filepath.Join(t.TempDir(), "sleep-copy")
	if err := os.WriteFile(copyPath, src, 0o755); err != nil {
		t.Fatalf("write copy: %v", err)
	}
	cmd := exec.Command(copyPath, "5")
	if err := cmd.Start(); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			t.Skipf("cannot run a binary from the temp dir (noexec mount?): %v", err)
		}
		t.Fatalf("start copy: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if err := os.Remove(copyPath); err != nil {
		t.Fatalf("remove copy: %v", err)
	}

	p := self()
	p.PID = int32(cmd.Process.Pid)
	_, err = Unix{}.Attest(context.Background(), p)
	if !errors.Is(err, ErrExeDeleted) {
		t.Fatalf("error = %v, want ErrExeDeleted", err)
	}
	if !strings.Contains(err.Error(), copyPath) {
		t.Errorf("error %q does not name the deleted binary %s", err, copyPath)
	}
}

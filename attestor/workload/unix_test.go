package workload

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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
	"github.com/lanyard-dev/lanyard/selector"
)

func self() Process {
	return Process{PID: int32(os.Getpid()), UID: uint32(os.Geteuid()), GID: uint32(os.Getegid())}
}

func newWorkload(t testing.TB, names ...string) *Workload {
	t.Helper()
	w, err := New(Config{Attestors: names})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return w
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

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// cgroupSelectors returns what /proc/<pid>/cgroup yields for pid.
func cgroupSelectors(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	info, err := ParseCgroup(b)
	if err != nil {
		t.Fatal(err)
	}
	return info.Selectors()
}

// selfSelectors is every selector the test process should get.
func selfSelectors(t *testing.T) []string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := self()
	want := []string{
		"unix:uid:" + strconv.Itoa(int(p.UID)),
		"unix:gid:" + strconv.Itoa(int(p.GID)),
		"unix:path:" + exe,
		"unix:sha256:" + fileSHA256(t, exe),
	}
	want = append(want, wantNames(t, p.UID, p.GID)...)
	want = append(want, cgroupSelectors(t, os.Getpid())...)
	slices.Sort(want)
	return want
}

func TestWorkloadAttestSelf(t *testing.T) {
	want := selfSelectors(t)
	got, err := newWorkload(t).Attest(context.Background(), self())
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("selectors (-want +got):\n%s", diff)
	}
	for _, s := range got {
		if err := selector.Validate(s); err != nil {
			t.Errorf("policy refuses a selector the agent produces: %v", err)
		}
	}
}

// TestWorkloadAttestorsChosenByConfig: each attestor yields the selectors
// of its own type and nothing else.
func TestWorkloadAttestorsChosenByConfig(t *testing.T) {
	all := selfSelectors(t)
	only := func(types ...string) []string {
		var out []string
		for _, s := range all {
			typ, _, _ := strings.Cut(s, ":")
			if slices.Contains(types, typ) {
				out = append(out, s)
			}
		}
		return out
	}
	tests := []struct {
		name  string
		names []string
		want  []string
	}{
		{name: "default is all", names: nil, want: all},
		{name: "all listed", names: []string{"k8s", "container", "cgroup", "systemd", "unix"}, want: all},
		{name: "unix", names: []string{"unix"}, want: only("unix")},
		{name: "cgroup", names: []string{"cgroup"}, want: only("cgroup")},
		{name: "cgroup families", names: []string{"systemd", "container", "k8s"}, want: only("systemd", "container", "k8s")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := newWorkload(t, tc.names...).Attest(context.Background(), self())
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("selectors (-want +got):\n%s", diff)
			}
		})
	}
}

func TestNewWorkloadRefuses(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "unknown attestor", cfg: Config{Attestors: []string{"unix", "docker"}}, wantErr: `unknown workload attestor "docker" (want unix, systemd, cgroup, container, k8s)`},
		{name: "repeated attestor", cfg: Config{Attestors: []string{"unix", "unix"}}, wantErr: `workload attestor "unix" is listed twice`},
		{name: "negative cache size", cfg: Config{HashCacheSize: -1}, wantErr: "hash cache size -1 is negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, err := New(tc.cfg)
			if err == nil || err.Error() != tc.wantErr {
				t.Fatalf("New = %v, %v; want error %q", w, err, tc.wantErr)
			}
		})
	}
}

func TestWorkloadAttestErrors(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	other := self()
	other.UID++

	tests := []struct {
		name    string
		ctx     context.Context
		p       Process
		wantErr error
	}{
		{name: "nonexistent pid", ctx: context.Background(), p: Process{PID: unusedPID(t)}, wantErr: ErrCallerExited},
		{name: "canceled context", ctx: canceled, p: self(), wantErr: context.Canceled},
		{name: "uid differs from /proc", ctx: context.Background(), p: other, wantErr: ErrCallerChanged},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sels, err := newWorkload(t).Attest(tc.ctx, tc.p)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if sels != nil {
				t.Errorf("selectors %v returned with an error", sels)
			}
			if want := "attest pid " + strconv.Itoa(int(tc.p.PID)); !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error %q does not start with %q", err, want)
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

func sleepPath(t testing.TB) string {
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

// copyExe copies the binary at src into a fresh directory every user can
// enter, so a child under another uid can run it.
func copyExe(t testing.TB, src, name string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, name)
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// startSleep starts `path 60` and stops it when the test ends. Start
// returns only after execve succeeded, so /proc/<pid>/exe already names the
// new binary.
func startSleep(t testing.TB, path string, cred *syscall.Credential) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(path, "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if err := cmd.Start(); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			t.Skipf("cannot run %s (noexec temp dir?): %v", path, err)
		}
		t.Fatalf("start %s: %v", path, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

// TestWorkloadAttestOtherUser attests a process under another uid running
// its own copy of sleep: its path and the hash of that copy.
func TestWorkloadAttestOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("starting a process as uid 65534 needs root")
	}
	exe := copyExe(t, sleepPath(t), "sleep-copy")
	cmd := startSleep(t, exe, &syscall.Credential{Uid: 65534, Gid: 65534})
	p, err := PinPID(int32(cmd.Process.Pid))
	if err != nil {
		t.Fatalf("PinPID: %v", err)
	}
	defer p.PIDFD.Close()
	if p.UID != 65534 || p.GID != 65534 {
		t.Fatalf("PinPID ids = %d/%d, want 65534/65534", p.UID, p.GID)
	}

	got, err := newWorkload(t).Attest(context.Background(), p)
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	want := []string{"unix:gid:65534", "unix:path:" + exe, "unix:sha256:" + fileSHA256(t, exe), "unix:uid:65534"}
	want = append(want, wantNames(t, 65534, 65534)...)
	want = append(want, cgroupSelectors(t, cmd.Process.Pid)...)
	slices.Sort(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("selectors (-want +got):\n%s", diff)
	}
}

func TestWorkloadAttestDeletedExe(t *testing.T) {
	exe := copyExe(t, sleepPath(t), "sleep-copy")
	cmd := startSleep(t, exe, nil)
	if err := os.Remove(exe); err != nil {
		t.Fatalf("remove copy: %v", err)
	}
	p := self()
	p.PID = int32(cmd.Process.Pid)
	_, err := newWorkload(t).Attest(context.Background(), p)
	if !errors.Is(err, ErrExeDeleted) {
		t.Fatalf("error = %v, want ErrExeDeleted", err)
	}
	if !strings.Contains(err.Error(), exe) {
		t.Errorf("error %q does not name the deleted binary %s", err, exe)
	}
}

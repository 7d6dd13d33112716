package workload

import (
	"context"
	"errors"
	"io"
	"os/exec"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testwait"
)

// execOnCommand starts a shell that execs `sleep 60` when a line arrives on
// its stdin, and returns it with that pipe. The shell and sleep are other
// files, so its executable changes while its PID, pidfd and start time stay.
func execOnCommand(t *testing.T, cred *syscall.Credential) (*exec.Cmd, io.WriteCloser) {
	t.Helper()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skipf("no sh on PATH: %v", err)
	}
	cmd := exec.Command(sh, "-c", `read line; exec "$0" 60`, sleepPath(t))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sh: %v", err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd, stdin
}

// TestRecheck: a pinned process is confirmed while it is what it was when
// pinned, and refused with the right reason once it exec'd, changed uid
// or exited. Attest refuses the same way, so a call can never be served the
// identity of the program a connected process became.
func TestRecheck(t *testing.T) {
	tests := []struct {
		name   string
		change func(t *testing.T, cmd *exec.Cmd, stdin io.Writer)
		// otherUID says the process connected under another uid (as if
		// it had called setuid since).
		otherUID bool
		wantErr  error
	}{
		{name: "unchanged", change: func(*testing.T, *exec.Cmd, io.Writer) {}},
		{name: "exec'd another program", change: func(t *testing.T, cmd *exec.Cmd, stdin io.Writer) {
			if _, err := io.WriteString(stdin, "go\n"); err != nil {
				t.Fatal(err)
			}
			testwait.Exe(t, cmd.Process.Pid, sleepPath(t))
		}, wantErr: ErrCallerExeced},
		{name: "changed uid", change: func(*testing.T, *exec.Cmd, io.Writer) {}, otherUID: true, wantErr: ErrCallerChanged},
		{name: "exited", change: func(t *testing.T, cmd *exec.Cmd, _ io.Writer) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}, wantErr: ErrCallerExited},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd, stdin := execOnCommand(t, nil)
			p, err := PinPID(int32(cmd.Process.Pid))
			if err != nil {
				t.Fatalf("PinPID: %v", err)
			}
			defer p.PIDFD.Close()
			if p.Exe == (FileID{}) || p.StartTime == 0 {
				t.Fatalf("PinPID recorded exe %s, start time %d", p.Exe, p.StartTime)
			}
			if tc.otherUID {
				p.UID++
			}
			tc.change(t, cmd, stdin)

			err = p.Recheck()
			sels, attestErr := newWorkload(t).Attest(context.Background(), p)
			if tc.wantErr == nil {
				if err != nil || attestErr != nil {
					t.Fatalf("Recheck = %v, Attest = %v; want both nil", err, attestErr)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("Recheck = %v, want %v", err, tc.wantErr)
			}
			if !errors.Is(attestErr, tc.wantErr) || sels != nil {
				t.Errorf("Attest = %v, %v; want %v and no selectors", sels, attestErr, tc.wantErr)
			}
		})
	}
}

// TestIdentify records the executable and start time of a live process
// and refuses one that is gone.
func TestIdentify(t *testing.T) {
	sleep := sleepPath(t)
	cmd := startSleep(t, sleep, nil)
	fd, err := openPIDFD(int32(cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	p, err := Identify(Process{PID: int32(cmd.Process.Pid), PIDFD: fd})
	if err != nil {
		t.Fatalf("Identify: %v", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(sleep, &st); err != nil {
		t.Fatal(err)
	}
	if want := (FileID{Dev: st.Dev, Ino: st.Ino}); p.Exe != want {
		t.Errorf("Exe = %s, want %s (stat of %s)", p.Exe, want, sleep)
	}
	// The pidfd is the witness; /proc/<pid>/stat is not read.
	if p.StartTime != 0 {
		t.Errorf("StartTime = %d, want 0: Identify leaves it to the pidfd", p.StartTime)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if _, err := Identify(Process{PID: int32(cmd.Process.Pid), PIDFD: fd}); !errors.Is(err, ErrCallerExited) {
		t.Fatalf("Identify of an exited process = %v, want ErrCallerExited", err)
	}
}

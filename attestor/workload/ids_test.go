package workload

import (
	"errors"
	"io/fs"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testwait"
)

// pidfdOf opens a pidfd on pid, closed when the test ends.
func pidfdOf(t *testing.T, pid int) *os.File {
	t.Helper()
	fd, err := openPIDFD(int32(pid))
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	t.Cleanup(func() { _ = fd.Close() })
	return fd
}

// needPidfdInfo skips the test on kernels without PIDFD_GET_INFO's
// credentials (before 6.13), where only /proc can be asked.
func needPidfdInfo(t *testing.T, fd *os.File) {
	t.Helper()
	if _, _, err := pidfdIDs(fd); errors.Is(err, errNoPidfdInfo) {
		t.Skipf("kernel has no PIDFD_GET_INFO: %v", err)
	}
}

// TestIDSourcesAgree: the pidfd and /proc/<pid>/status give the same
// effective uid and gid, the ones the process runs as, for this process
// and for a child under another uid and gid; idReader takes the pidfd's
// answer and stays with it.
func TestIDSourcesAgree(t *testing.T) {
	tests := []struct {
		name string
		// start returns the process to read and the ids it runs as.
		start func(t *testing.T) (pid int, uid, gid uint32)
	}{
		{name: "self", start: func(*testing.T) (int, uint32, uint32) {
			return os.Getpid(), uint32(os.Geteuid()), uint32(os.Getegid())
		}},
		{name: "child as 65534", start: func(t *testing.T) (int, uint32, uint32) {
			if os.Geteuid() != 0 {
				t.Skip("starting a process as uid 65534 needs root")
			}
			cmd := startSleep(t, sleepPath(t), &syscall.Credential{Uid: 65534, Gid: 65534})
			return cmd.Process.Pid, 65534, 65534
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pid, wantUID, wantGID := tc.start(t)
			fd := pidfdOf(t, pid)
			needPidfdInfo(t, fd)
			dir := procDir(int32(pid))

			uid, gid, err := pidfdIDs(fd)
			if err != nil || uid != wantUID || gid != wantGID {
				t.Errorf("pidfdIDs = %d, %d, %v; want %d, %d", uid, gid, err, wantUID, wantGID)
			}
			uid, gid, err = readStatusIDs(dir)
			if err != nil || uid != wantUID || gid != wantGID {
				t.Errorf("readStatusIDs = %d, %d, %v; want %d, %d", uid, gid, err, wantUID, wantGID)
			}
			var r idReader
			uid, gid, err = r.read(dir, fd)
			if err != nil || uid != wantUID || gid != wantGID {
				t.Errorf("idReader.read = %d, %d, %v; want %d, %d", uid, gid, err, wantUID, wantGID)
			}
			if r.statusOnly.Load() {
				t.Error("idReader fell back to /proc on a kernel that answers PIDFD_GET_INFO")
			}
		})
	}
}

// TestIDReaderFallsBack: when the ioctl is refused as unknown (here by a
// file that is not a pidfd: ENOTTY, as a kernel before 6.13 answers),
// idReader answers from /proc/<pid>/status and asks only /proc from then
// on; a closed pidfd, which the ioctl would report as an exit, proves it.
func TestIDReaderFallsBack(t *testing.T) {
	notPidfd, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer notPidfd.Close()
	if _, _, err := pidfdIDs(notPidfd); !errors.Is(err, errNoPidfdInfo) || !errors.Is(err, syscall.ENOTTY) {
		t.Fatalf("pidfdIDs(%s) = %v, want errNoPidfdInfo from ENOTTY", os.DevNull, err)
	}

	dir := procDir(int32(os.Getpid()))
	wantUID, wantGID := uint32(os.Geteuid()), uint32(os.Getegid())
	var r idReader
	uid, gid, err := r.read(dir, notPidfd)
	if err != nil || uid != wantUID || gid != wantGID {
		t.Fatalf("idReader.read = %d, %d, %v; want %d, %d from status", uid, gid, err, wantUID, wantGID)
	}
	if !r.statusOnly.Load() {
		t.Fatal("idReader did not remember that the kernel refused the ioctl")
	}

	closed := pidfdOf(t, os.Getpid())
	_ = closed.Close()
	if _, _, err := pidfdIDs(closed); !errors.Is(err, ErrCallerExited) {
		t.Fatalf("pidfdIDs on a closed pidfd = %v, want ErrCallerExited", err)
	}
	uid, gid, err = r.read(dir, closed)
	if err != nil || uid != wantUID || gid != wantGID {
		t.Fatalf("idReader.read after the fallback = %d, %d, %v; want %d, %d without the ioctl", uid, gid, err, wantUID, wantGID)
	}
}

// TestCheckIDsExited: a caller that exited is refused as ErrCallerExited
// by confirm, from either source of ids, whether it is still a zombie or
// already reaped. A zombie still has its credentials, so checkIDs may
// read them (the pidfd's last check refuses it); a reaped one has none:
// the pidfd says it exited, /proc that the entry is gone (which confirm
// reports as the exit).
func TestCheckIDsExited(t *testing.T) {
	sources := []struct {
		name       string
		statusOnly bool
		// reapedErr is what checkIDs wraps for a reaped caller.
		reapedErr error
	}{
		{name: "pidfd", reapedErr: ErrCallerExited},
		{name: "status", statusOnly: true, reapedErr: fs.ErrNotExist},
	}
	states := []struct {
		name string
		reap bool
	}{
		{name: "zombie"},
		{name: "reaped", reap: true},
	}
	for _, src := range sources {
		for _, st := range states {
			t.Run(src.name+"/"+st.name, func(t *testing.T) {
				cmd := startSleep(t, sleepPath(t), nil)
				fd := pidfdOf(t, cmd.Process.Pid)
				if !src.statusOnly {
					needPidfdInfo(t, fd)
				}
				p, err := Identify(Process{
					PID: int32(cmd.Process.Pid), PIDFD: fd,
					UID: uint32(os.Geteuid()), GID: uint32(os.Getegid()),
				})
				if err != nil {
					t.Fatalf("Identify: %v", err)
				}
				ids := &idReader{}
				ids.statusOnly.Store(src.statusOnly)
				c := &caller{Process: p, dir: procDir(p.PID), ids: ids}
				if err := c.confirm(true); err != nil {
					t.Fatalf("confirm while alive: %v", err)
				}

				if err := cmd.Process.Kill(); err != nil {
					t.Fatal(err)
				}
				if st.reap {
					_ = cmd.Wait()
				} else {
					// Exited, not reaped: the pidfd says so, /proc
					// still lists it.
					testwait.For(t, 10*time.Second, "the child to exit", func() bool {
						return errors.Is(checkAlive(fd), ErrCallerExited)
					})
					if _, err := os.Stat(c.dir); err != nil {
						t.Fatalf("zombie's /proc entry: %v", err)
					}
				}

				err = c.checkIDs()
				switch {
				case st.reap && !errors.Is(err, src.reapedErr):
					t.Errorf("checkIDs of a reaped caller = %v, want %v", err, src.reapedErr)
				case !st.reap && err != nil && !errors.Is(err, ErrCallerExited):
					t.Errorf("checkIDs of a zombie = %v, want nil or ErrCallerExited", err)
				}
				if err := c.confirm(true); !errors.Is(err, ErrCallerExited) {
					t.Errorf("confirm = %v, want ErrCallerExited", err)
				}
				if err := c.confirm(false); !errors.Is(err, ErrCallerExited) {
					t.Errorf("confirm without start time = %v, want ErrCallerExited", err)
				}
			})
		}
	}
}

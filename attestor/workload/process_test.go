package workload

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// statLine is a /proc/<pid>/stat line with the given command name and
// start time (field 22), the rest as a 6.x kernel prints it.
func statLine(comm string, start uint64) string {
	return fmt.Sprintf("4242 (%s) S 1 4242 4242 0 -1 4194560 1062 0 0 0 1 0 0 0 20 0 1 0 %d 8757248 1024 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 3 0 0 0 0 0 0 0 0 0 0 0 0 0\n", comm, start)
}

func TestParseStartTime(t *testing.T) {
	tests := []struct {
		name    string
		stat    string
		want    uint64
		wantErr string
	}{
		{name: "plain", stat: statLine("sleep", 123456), want: 123456},
		{name: "spaces and parentheses in the name", stat: statLine(") 1 2 (x) y", 77), want: 77},
		{name: "name that looks like fields", stat: statLine("a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 999", 5), want: 5},
		{name: "empty name", stat: statLine("", 9), want: 9},
		{name: "no name", stat: "4242 S 1", wantErr: "no command name"},
		{name: "truncated", stat: "4242 (sleep) S 1 4242", wantErr: "want at least 20"},
		{name: "start not a number", stat: strings.Replace(statLine("sleep", 1), " 1 8757248", " x 8757248", 1), wantErr: "start time"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseStartTime([]byte(tc.stat))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseStartTime = %d, %v; want an error containing %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("parseStartTime = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestParseStatusIDs(t *testing.T) {
	const head = "Name:\tweb\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n"
	tests := []struct {
		name             string
		status           string
		wantUID, wantGID uint32
		wantErr          string
	}{
		{name: "effective ids", status: head + "Uid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\nGroups:\t4 24\n", wantUID: 1001, wantGID: 2001},
		{name: "escaped newline in name", status: "Name:\tx\\nUid:\t0\t0\t0\t0\n" + "Uid:\t7\t7\t7\t7\nGid:\t8\t8\t8\t8\n", wantUID: 7, wantGID: 8},
		{name: "no Gid", status: head + "Uid:\t1\t1\t1\t1\n", wantErr: "lacks a Uid or Gid"},
		{name: "short Uid", status: head + "Uid:\t1\t1\nGid:\t1\t1\t1\t1\n", wantErr: "want 4"},
		{name: "id too large", status: head + "Uid:\t1\t4294967296\t1\t1\nGid:\t1\t1\t1\t1\n", wantErr: "Uid line"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			uid, gid, err := parseStatusIDs([]byte(tc.status))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseStatusIDs = %d, %d, %v; want an error containing %q", uid, gid, err, tc.wantErr)
				}
				return
			}
			if err != nil || uid != tc.wantUID || gid != tc.wantGID {
				t.Fatalf("parseStatusIDs = %d, %d, %v; want %d, %d", uid, gid, err, tc.wantUID, tc.wantGID)
			}
		})
	}
}

// FuzzParseStartTime: whatever the command name holds, the start time is
// found.
func FuzzParseStartTime(f *testing.F) {
	f.Add("sleep", uint64(1))
	f.Add(") (", uint64(1<<63))
	f.Add("a b\nc) 1 2", uint64(0))
	f.Fuzz(func(t *testing.T, comm string, start uint64) {
		got, err := parseStartTime([]byte(statLine(comm, start)))
		if err != nil || got != start {
			t.Fatalf("parseStartTime(name %q) = %d, %v; want %d", comm, got, err, start)
		}
	})
}

// FuzzParseStatusIDs: any input, no panic; ids only from well-formed lines.
func FuzzParseStatusIDs(f *testing.F) {
	f.Add([]byte("Uid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\n"))
	f.Add([]byte("Uid:\nGid:"))
	f.Fuzz(func(t *testing.T, status []byte) {
		uid, gid, err := parseStatusIDs(status)
		if err != nil && (uid != 0 || gid != 0) {
			t.Fatalf("error %v with ids %d/%d", err, uid, gid)
		}
		if err == nil && (!strings.Contains(string(status), "Uid:") || !strings.Contains(string(status), "Gid:")) {
			t.Fatalf("ids from a status without Uid and Gid lines: %q", status)
		}
	})
}

func TestPinPID(t *testing.T) {
	t.Run("self", func(t *testing.T) {
		p, err := PinPID(int32(os.Getpid()))
		if err != nil {
			t.Fatalf("PinPID: %v", err)
		}
		defer p.PIDFD.Close()
		if p.UID != uint32(os.Geteuid()) || p.GID != uint32(os.Getegid()) {
			t.Errorf("ids = %d/%d, want %d/%d", p.UID, p.GID, os.Geteuid(), os.Getegid())
		}
		if p.StartTime == 0 {
			t.Error("no start time")
		}
		if err := checkAlive(p.PIDFD); err != nil {
			t.Errorf("checkAlive on self: %v", err)
		}
	})
	t.Run("exited", func(t *testing.T) {
		cmd := startSleep(t, sleepPath(t), nil)
		pid := int32(cmd.Process.Pid)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if _, err := PinPID(pid); !errors.Is(err, ErrCallerExited) {
			t.Fatalf("PinPID of a reaped process = %v, want ErrCallerExited", err)
		}
	})
	t.Run("closed pidfd", func(t *testing.T) {
		p, err := PinPID(int32(os.Getpid()))
		if err != nil {
			t.Fatalf("PinPID: %v", err)
		}
		_ = p.PIDFD.Close()
		if err := checkAlive(p.PIDFD); !errors.Is(err, ErrCallerExited) {
			t.Fatalf("checkAlive on a closed pidfd = %v, want ErrCallerExited", err)
		}
	})
}

// TestProcReadsAllocate: the /proc reads of every attestation and re-check
// read into a pooled buffer (procBufs) and parse in place: only the path
// and its C copy for open(2) are allocated, and for cgroup the selectors
// (BENCHMARKS.md, "Issue 19"); the ids from the pidfd cost nothing. It
// fails if a read goes back to a heap buffer per file or a copy per field,
// or forgets to give its buffer back.
func TestProcReadsAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes what escapes to the heap")
	}
	p, err := PinPID(int32(os.Getpid()))
	if err != nil {
		t.Fatalf("PinPID: %v", err)
	}
	defer p.PIDFD.Close()
	dir := procDir(p.PID)
	c := &caller{Process: p, dir: dir}
	tests := []struct {
		name string
		read func() error
		max  float64
	}{
		{"stat", func() error { _, err := readStartTime(dir); return err }, 2},
		{"status", func() error { _, _, err := readStatusIDs(dir); return err }, 2},
		{"cgroup", func() error { _, err := cgroupAttestor{}.selectors(c); return err }, 4},
		{"pidfd ids", func() error {
			_, _, err := pidfdIDs(p.PIDFD)
			if errors.Is(err, errNoPidfdInfo) {
				t.Skipf("kernel has no PIDFD_GET_INFO: %v", err)
			}
			return err
		}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.read(); err != nil {
				t.Fatal(err)
			}
			if n := testing.AllocsPerRun(100, func() { _ = tc.read() }); n > tc.max {
				t.Errorf("%s read: %v allocations, want at most %v", tc.name, n, tc.max)
			}
		})
	}
}

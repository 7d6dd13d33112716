package workload

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestNewPIDFDStaysBlocking: the pidfd is not handed to Go's poller (a
// non-blocking descriptor would be, at four system calls per connection),
// and the checks still work on it.
func TestNewPIDFDStaysBlocking(t *testing.T) {
	fd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		t.Fatalf("pidfd_open: %v", err)
	}
	f, err := NewPIDFD(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Through Control: Fd() would make a polled descriptor blocking.
	raw, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var flags int
	if err := raw.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFL, 0) }); err != nil {
		t.Fatal(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK != 0 {
		t.Fatalf("pidfd flags %#x include O_NONBLOCK: Go's poller registers it", flags)
	}
	if err := checkAlive(f); err != nil {
		t.Fatalf("checkAlive on this process: %v", err)
	}
	if _, _, err := pidfdIDs(f); err != nil && err != errNoPidfdInfo {
		t.Fatalf("pidfdIDs: %v", err)
	}
}

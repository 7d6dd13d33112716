package workload

import (
	"os"
	"testing"
	"unsafe"

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

// TestPidfdInfoV0Layout: the request is the kernel's at the VER0 size, and
// the struct has that size, with the credentials where the kernel puts them.
func TestPidfdInfoV0Layout(t *testing.T) {
	if got := unsafe.Sizeof(pidfdInfoV0{}); got != unix.PIDFD_INFO_SIZE_VER0 {
		t.Errorf("pidfdInfoV0 is %d bytes, want %d", got, unix.PIDFD_INFO_SIZE_VER0)
	}
	// x/sys's request number differs from ours only in the size field.
	const sizeMask = 0x3fff << 16
	if uint32(unix.PIDFD_GET_INFO)&^sizeMask != uint32(pidfdGetInfoV0)&^sizeMask || pidfdGetInfoV0 != 0xc040ff0b {
		t.Errorf("request %#x, x/sys's %#x: want the same but for the size", pidfdGetInfoV0, uint32(unix.PIDFD_GET_INFO))
	}
	if unsafe.Offsetof(pidfdInfoV0{}.Euid) != unsafe.Offsetof(unix.PidfdInfo{}.Euid) ||
		unsafe.Offsetof(pidfdInfoV0{}.Egid) != unsafe.Offsetof(unix.PidfdInfo{}.Egid) {
		t.Error("Euid or Egid is not where the kernel's struct has it")
	}
}

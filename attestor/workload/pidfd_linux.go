package workload

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// openPIDFD opens a pidfd on the process that holds pid now.
func openPIDFD(pid int32) (*os.File, error) {
	fd, err := unix.PidfdOpen(int(pid), 0)
	switch {
	case errors.Is(err, unix.ESRCH):
		return nil, fmt.Errorf("%w: pidfd_open: %w", ErrCallerExited, err)
	case errors.Is(err, unix.ENOSYS):
		return nil, fmt.Errorf("pidfd_open (needs Linux 5.3 or later): %w", err)
	case err != nil:
		return nil, fmt.Errorf("pidfd_open: %w", err)
	}
	return NewPIDFD(fd)
}

// NewPIDFD wraps the pidfd fd as an *os.File. The descriptor is left as
// the kernel made it (blocking), so Go's poller never registers it: nothing
// ever blocks on a pidfd. Checks poll it with a zero timeout (checkAlive),
// and the Workload API server waits for exits through one epoll set of its
// own (workloadapi/exitwatch.go). Registering it would cost four system
// calls per connection (two fcntl, an epoll add and remove) for nothing.
// The error is for callers on platforms without pidfds.
func NewPIDFD(fd int) (*os.File, error) {
	return os.NewFile(uintptr(fd), "pidfd"), nil
}

// readExeID stats <dir>/exe: stat, not lstat, so that it names the file
// the process runs (found through the kernel's own reference, even if
// unlinked), not the symlink procfs shows.
func readExeID(dir string) (FileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir+"/exe", &st); err != nil {
		return FileID{}, fmt.Errorf("stat exe: %w", err)
	}
	return FileID{Dev: st.Dev, Ino: st.Ino}, nil
}

// checkAlive returns nil while the process fd pins has not exited, and an
// error wrapping ErrCallerExited once it has. A pidfd becomes readable when
// its process exits, before it is reaped and its PID can be handed out
// again; polling needs no permission over the process (signal 0 would).
// A pidfd closed meanwhile (the connection ended) counts as gone.
func checkAlive(fd *os.File) error {
	raw, err := fd.SyscallConn()
	if err != nil {
		return fmt.Errorf("check pidfd: %w", err)
	}
	var revents int16
	var pollErr error
	ctlErr := raw.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			_, pollErr = unix.Poll(fds, 0)
			if !errors.Is(pollErr, unix.EINTR) {
				break
			}
		}
		revents = fds[0].Revents
	})
	switch {
	case ctlErr != nil:
		// The only way Control fails on a valid *os.File is that it was
		// closed (poll's "use of closed file", not os.ErrClosed).
		return fmt.Errorf("%w: pidfd closed with the connection: %w", ErrCallerExited, ctlErr)
	case pollErr != nil:
		return fmt.Errorf("check pidfd: poll: %w", pollErr)
	case revents != 0:
		// POLLIN (exited), POLLHUP (reaped) or POLLNVAL/POLLERR (not a
		// pidfd): none of them is a live caller.
		return fmt.Errorf("%w: pidfd reports exit", ErrCallerExited)
	}
	return nil
}

// pidfdIDs asks the kernel for the effective uid and gid of the process fd
// pins (ioctl PIDFD_GET_INFO): the credentials themselves, where
// /proc/<pid>/status formats a page of text around them. A process already
// reaped is an error wrapping ErrCallerExited; a kernel that cannot answer,
// errNoPidfdInfo. One that exited but is not reaped yet still answers:
// checkAlive, after every read, is what refuses it.
func pidfdIDs(fd *os.File) (uid, gid uint32, err error) {
	raw, err := fd.SyscallConn()
	if err != nil {
		return 0, 0, fmt.Errorf("pidfd info: %w", err)
	}
	info := pidfdInfoV0{Mask: unix.PIDFD_INFO_CREDS}
	var ioctlErr error
	ctlErr := raw.Control(func(fd uintptr) {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, pidfdGetInfoV0, uintptr(unsafe.Pointer(&info)))
		if errno != 0 {
			ioctlErr = errno
		}
	})
	switch {
	case ctlErr != nil:
		// As in checkAlive: the connection closed its pidfd.
		return 0, 0, fmt.Errorf("%w: pidfd closed with the connection: %w", ErrCallerExited, ctlErr)
	case errors.Is(ioctlErr, unix.ESRCH):
		return 0, 0, fmt.Errorf("%w: pidfd info: %w", ErrCallerExited, ioctlErr)
	case errors.Is(ioctlErr, unix.ENOTTY), errors.Is(ioctlErr, unix.EINVAL):
		// ENOTTY: no such ioctl (before 6.13, or a pidfd that is not
		// on pidfs, before 6.9). EINVAL: a kernel that refuses the
		// request's size.
		return 0, 0, fmt.Errorf("pidfd info: %w: %w", errNoPidfdInfo, ioctlErr)
	case ioctlErr != nil:
		return 0, 0, fmt.Errorf("pidfd info: %w", ioctlErr)
	case info.Mask&unix.PIDFD_INFO_CREDS == 0:
		return 0, 0, fmt.Errorf("pidfd info: %w", errNoPidfdInfo)
	}
	return info.Euid, info.Egid, nil
}

// pidfdInfoV0 is struct pidfd_info as Linux 6.13 first defined it
// (PIDFD_INFO_SIZE_VER0, 64 bytes). Sent at that size, PIDFD_GET_INFO works
// on every kernel that has it: 6.13 and 6.14 accept only their own size
// (the request number holds it), later kernels any size from VER0 up,
// answering the fields it holds. x/sys's unix.PidfdInfo is the 6.16 struct
// (88 bytes), which 6.13 and 6.14 refuse.
type pidfdInfoV0 struct {
	Mask, CgroupID                                                    uint64
	PID, TGID, PPID, RUID, RGID, Euid, Egid, SUID, SGID, FSUID, FSGID uint32
	ExitCode                                                          int32
}

// pidfdGetInfoV0 is _IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info) at
// the VER0 size: read and write, 64 bytes, type 0xFF, number 11.
const pidfdGetInfoV0 = 3<<30 | unix.PIDFD_INFO_SIZE_VER0<<16 | 0xFF<<8 | 11

// fdKey identifies the version of the file open as fd for the hash cache.
// ctime is in the key because a file's owner can write new bytes of the
// same size and then set mtime back (utimensat), but cannot set ctime,
// which the kernel moves on every write and every utimensat.
func fdKey(fd int) (exeKey, bool, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return exeKey{}, false, fmt.Errorf("fstat: %w", err)
	}
	return keyOfStat(&st), true, nil
}

// pathKey is fdKey for the file at path (following symlinks).
func pathKey(path string) (exeKey, bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return exeKey{}, false, fmt.Errorf("stat: %w", err)
	}
	return keyOfStat(&st), true, nil
}

// keyOfStat is the hash cache's key for the file version st describes.
func keyOfStat(st *unix.Stat_t) exeKey {
	return exeKey{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
}

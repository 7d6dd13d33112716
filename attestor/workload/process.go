package workload

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
)

// Refusals of workload attestation that the Workload API turns into
// Unavailable with their own message. Workload.Attest wraps them with the
// PID and the step that noticed.
var (
	// ErrCallerExited means the process that connected is gone: it exited
	// before or during attestation, so what /proc/<pid> said may belong to
	// a process that reused its PID. Nothing read is used.
	ErrCallerExited = errors.New("caller exited during attestation")
	// ErrCallerChanged means the caller's effective uid or gid is no longer
	// the one the kernel recorded when it connected: it ran setuid (or a
	// setuid program) since. The Workload API refuses it for good
	// (PermissionDenied): retrying on the same connection cannot help.
	ErrCallerChanged = errors.New("caller changed uid or gid since it connected")
	// ErrCallerExeced means the caller runs another executable than when
	// it connected: it called execve since. Its connection may be held by
	// another process (a fork, or one it passed the descriptor to) that
	// wants the new program's identity, so the Workload API refuses it for
	// good (PermissionDenied). Real clients connect after their exec.
	ErrCallerExeced = errors.New("caller ran another executable since it connected")
)

// Process is the kernel's account of a caller, taken from the socket when
// the Workload API accepted its connection.
//
// The PID is only a name for the process at one instant; PIDFD is the
// process itself. Workload.Attest reads /proc/<PID> and then asks PIDFD
// whether that process is still alive, which proves the PID named it
// during every read (see Workload.Attest). A Process with a nil PIDFD is
// pinned by Attest on entry, so a PID that was recycled before that moment
// is attested as whatever now holds it: only callers that know nothing
// better than a PID (lanyard-agent explain) should pass one.
type Process struct {
	// PID is the caller's process (thread-group) ID in the agent's PID
	// namespace: the kernel translates it, so a caller in a container
	// appears under its host PID.
	PID int32
	// UID and GID are the caller's effective ids when it connected
	// (SO_PEERCRED), in the agent's user namespace.
	UID, GID uint32
	// PIDFD is a pidfd open on the caller: from SO_PEERPIDFD (Linux 6.5+),
	// which names the very process that called connect(2), or from
	// pidfd_open(PID) just after accept on older kernels. Whoever opened it
	// closes it (the Workload API, when the connection closes); attestors
	// only use it.
	PIDFD *os.File
	// StartTime is the process start time (clock ticks after boot, field
	// 22 of /proc/<pid>/stat) read when the process was pinned by PinPID
	// (kernels without SO_PEERPIDFD), or 0. Attest checks it has not
	// changed, a second witness next to a PIDFD opened from a PID; a
	// pidfd from SO_PEERPIDFD needs none (Identify). It does not change on
	// exec; Exe does.
	StartTime uint64
	// Exe is the executable the process ran when it was pinned (Identify,
	// PinPID): the device and inode /proc/<pid>/exe leads to. Attest and
	// Recheck refuse a process whose executable is no longer this one
	// (ErrCallerExeced). The zero value means not recorded: nothing is
	// compared.
	Exe FileID
}

// FileID names a file by device and inode: the same however it is reached,
// and different for another file, even one at the same path.
type FileID struct {
	Dev, Ino uint64
}

// String returns "dev:ino", as logs show it.
func (f FileID) String() string {
	return strconv.FormatUint(f.Dev, 10) + ":" + strconv.FormatUint(f.Ino, 10)
}

// Identify returns p with what identifies its process at this moment
// recorded: Exe. The Workload API calls it when it accepts a connection,
// after taking p.PIDFD from SO_PEERPIDFD, so that later calls can tell
// whether the process that connected has run another executable since. The
// read is confirmed through p.PIDFD afterwards: a process that is gone is
// an error wrapping ErrCallerExited, and nothing read is used.
//
// No start time is recorded: that pidfd was taken by the kernel for the
// process that called connect(2), so it alone says whether that process
// still lives (see caller.confirm), as Recheck already relies on before
// every push. A start time that changed implies the process exited and was
// reaped, which the pidfd reports first; reading /proc/<pid>/stat twice per
// connection would cost a sixth of the agent's time per one-shot call and
// never change an answer. PinPID, for kernels without SO_PEERPIDFD, still
// records it.
func Identify(p Process) (Process, error) {
	exe, exeErr := readExeID(procDir(p.PID))
	// Checked after the read, so that it was of the pinned process.
	if err := checkAlive(p.PIDFD); err != nil {
		return Process{}, fmt.Errorf("identify pid %d: %w", p.PID, err)
	}
	if exeErr != nil {
		return Process{}, fmt.Errorf("identify pid %d: %w", p.PID, exiting(exeErr))
	}
	p.Exe = exe
	return p, nil
}

// exiting marks a failed /proc read of a process its pidfd still shows
// alive as ErrCallerExited when the entry was gone: the process is
// exiting (its memory, and with it exe, goes before the pidfd reports the
// exit). Either way it is refused; this only names the reason right.
func exiting(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("%w: exiting: %w", ErrCallerExited, err)
	}
	return err
}

// Recheck confirms that the process p pins is still the one that was
// identified: alive, running the same executable, with the same effective
// uid and gid. It is what the Workload API does before each push on a
// stream: a stat of /proc/<pid>/exe, the ids (an ioctl on the pidfd, or
// /proc/<pid>/status on older kernels: idReader) and a poll of the pidfd,
// last, so that the reads were of that process. The error wraps
// ErrCallerExited, ErrCallerExeced or ErrCallerChanged.
func (p Process) Recheck() error {
	c := &caller{Process: p, dir: procDir(p.PID)}
	if err := c.confirm(false); err != nil {
		return fmt.Errorf("recheck pid %d: %w", p.PID, err)
	}
	return nil
}

// ExePath returns where /proc/<pid>/exe leads now, for log lines only
// (what a refused caller runs), or "" when it cannot be read.
func (p Process) ExePath() string {
	exe, err := os.Readlink(procDir(p.PID) + "/exe")
	if err != nil {
		return ""
	}
	return exe
}

// PinPID returns the process that holds pid now, pinned: a pidfd open on
// it (the caller closes Process.PIDFD), its start time and executable
// (as Identify records them), and its effective uid and gid (from the
// pidfd, or /proc/<pid>/status: idReader). It is for callers that know only a
// PID: the Workload API on kernels without SO_PEERPIDFD (which then takes
// UID and GID from SO_PEERCRED instead) and lanyard-agent explain. A
// process that is gone is an error wrapping ErrCallerExited.
func PinPID(pid int32) (Process, error) {
	fd, err := openPIDFD(pid)
	if err != nil {
		return Process{}, fmt.Errorf("pin pid %d: %w", pid, err)
	}
	p, err := pinned(pid, fd)
	if err != nil {
		_ = fd.Close()
		return Process{}, fmt.Errorf("pin pid %d: %w", pid, err)
	}
	return p, nil
}

// pinned reads what PinPID reports about the process fd pins.
func pinned(pid int32, fd *os.File) (Process, error) {
	dir := procDir(pid)
	start, startErr := readStartTime(dir)
	exe, exeErr := readExeID(dir)
	uid, gid, idsErr := kernelIDs.read(dir, fd)
	// Checked after the reads, so that they were of the pinned process.
	if err := checkAlive(fd); err != nil {
		return Process{}, err
	}
	if err := errors.Join(startErr, exeErr, idsErr); err != nil {
		return Process{}, err
	}
	return Process{PID: pid, UID: uid, GID: gid, PIDFD: fd, StartTime: start, Exe: exe}, nil
}

// procDir is where procfs shows pid. The agent must see the host's procfs
// (run it in the host PID namespace): SO_PEERCRED PIDs are in its own.
func procDir(pid int32) string {
	return "/proc/" + strconv.FormatInt(int64(pid), 10)
}

// procFileSize is the size of the buffers /proc files are first read into:
// stat, status and cgroup fit, so attestation allocates nothing for them (a
// larger file grows onto the heap).
const procFileSize = 4096

// procBufs lends the buffers /proc files are read into. A pool, not an
// array on the reader's stack: a Workload API stream's handler attests once
// and then waits for hours, and a 4 KiB frame would have doubled its stack
// for all that time (BenchmarkAttestStack). Whoever takes one gives it back
// after parsing and keeps no slice of it. Package-level because the
// buffers are interchangeable and Identify, PinPID and Recheck have no
// Workload to hang a pool on.
var procBufs = sync.Pool{New: func() any { return new([procFileSize]byte) }}

// readStartTime reads the start time from <dir>/stat.
func readStartTime(dir string) (uint64, error) {
	buf := procBufs.Get().(*[procFileSize]byte)
	defer procBufs.Put(buf)
	b, err := readProcFile(dir+"/stat", buf[:0])
	if err != nil {
		return 0, fmt.Errorf("read stat: %w", err)
	}
	t, err := parseStartTime(b)
	if err != nil {
		return 0, fmt.Errorf("read stat: %w", err)
	}
	return t, nil
}

// readProcFile reads a small /proc file with plain system calls: os.Open
// would also try, and fail, to register it with the poller, which costs as
// much as the read (attestation reads three or four such files per call).
// It appends to b, which callers take from procBufs so that the read
// allocates nothing; the result must not outlive the buffer's return.
func readProcFile(path string, b []byte) ([]byte, error) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer syscall.Close(fd)
	for {
		if len(b) == cap(b) {
			b = slices.Grow(b, max(cap(b), procFileSize))
		}
		n, err := syscall.Read(fd, b[len(b):cap(b)])
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case err != nil:
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		case n == 0:
			return b, nil
		}
		b = b[:len(b)+n]
	}
}

// parseStartTime returns field 22 of /proc/<pid>/stat. The second field is
// the command name in parentheses, and the name itself may hold spaces and
// parentheses, so fields are counted from the last ')'.
func parseStartTime(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("no command name in stat")
	}
	// The first field after the name is field 3 (state), so field 22 is
	// the 20th. Walked in place: no copy of the line, no slice of fields.
	rest := stat[i+1:]
	var field []byte
	n := 0
	for n < 20 {
		rest = bytes.TrimLeft(rest, asciiSpace)
		if len(rest) == 0 {
			break
		}
		end := bytes.IndexAny(rest, asciiSpace)
		if end < 0 {
			end = len(rest)
		}
		field, rest = rest[:end], rest[end:]
		n++
	}
	if n < 20 {
		return 0, fmt.Errorf("stat has %d fields after the command name, want at least 20", n)
	}
	t, err := strconv.ParseUint(string(field), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("start time: %w", err)
	}
	return t, nil
}

// asciiSpace is what separates the fields of /proc's stat and status
// lines, as strings.Fields sees them there.
const asciiSpace = " \t\n\v\f\r"

// idReader reads a pinned process's effective uid and gid from the cheapest
// source the kernel offers: PIDFD_GET_INFO on its pidfd, an ioctl that
// copies the ids (Linux 6.13+; asked at the struct's first size, which
// every such kernel takes, pidfdInfoV0),
// else /proc/<pid>/status, a file the kernel formats in full (the costliest
// read of attestation, BENCHMARKS.md "Issue 19"). Both report the
// same credentials, those of the thread-group leader, in the agent's user
// namespace.
type idReader struct {
	// statusOnly is set once the kernel has refused PIDFD_GET_INFO: it
	// will refuse it for every pidfd, so later calls go straight to
	// /proc instead of paying a failed ioctl each.
	statusOnly atomic.Bool
}

// kernelIDs is the agent's idReader. Package-level because what it learns
// is a fact of the running kernel, the same for every caller and every
// Workload; tests use their own.
var kernelIDs idReader

// read returns the effective uid and gid of the process that fd pins and
// dir (/proc/<pid>) shows. Like every read of confirm, it proves nothing
// until checkAlive has vouched that fd's process was still alive after it.
// A process already reaped is an error wrapping ErrCallerExited from the
// pidfd, and fs.ErrNotExist from /proc.
func (r *idReader) read(dir string, fd *os.File) (uid, gid uint32, err error) {
	if fd != nil && !r.statusOnly.Load() {
		uid, gid, err := pidfdIDs(fd)
		if !errors.Is(err, errNoPidfdInfo) {
			return uid, gid, err
		}
		r.statusOnly.Store(true)
	}
	return readStatusIDs(dir)
}

// errNoPidfdInfo means the kernel cannot report a process's credentials
// through its pidfd (before 6.13): /proc is read instead.
var errNoPidfdInfo = errors.New("kernel has no PIDFD_GET_INFO with credentials")

// readStatusIDs reads the effective uid and gid from <dir>/status.
func readStatusIDs(dir string) (uid, gid uint32, err error) {
	buf := procBufs.Get().(*[procFileSize]byte)
	defer procBufs.Put(buf)
	b, err := readProcFile(dir+"/status", buf[:0])
	if err != nil {
		return 0, 0, fmt.Errorf("read status: %w", err)
	}
	uid, gid, err = parseStatusIDs(b)
	if err != nil {
		return 0, 0, fmt.Errorf("read status: %w", err)
	}
	return uid, gid, nil
}

// parseStatusIDs returns the effective uid and gid from /proc/<pid>/status
// ("Uid:\treal\teffective\tsaved\tfs"). Effective, because that is what
// SO_PEERCRED records. The kernel escapes newlines in the Name line, so a
// line that starts with "Uid:" is the real one.
func parseStatusIDs(status []byte) (uid, gid uint32, err error) {
	var haveUID, haveGID bool
	for more := status; len(more) > 0; {
		// Split in place: no iterator, no copy.
		line := more
		if i := bytes.IndexByte(more, '\n'); i >= 0 {
			line, more = more[:i+1], more[i+1:]
		} else {
			more = nil
		}
		k, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok || (string(k) != "Uid" && string(k) != "Gid") {
			continue
		}
		key := "Uid"
		if string(k) == "Gid" {
			key = "Gid"
		}
		// Four fields, the second the effective id; counted in place.
		var effective []byte
		nf := 0
		for {
			rest = bytes.TrimLeft(rest, asciiSpace)
			if len(rest) == 0 {
				break
			}
			end := bytes.IndexAny(rest, asciiSpace)
			if end < 0 {
				end = len(rest)
			}
			if nf == 1 {
				effective = rest[:end]
			}
			rest = rest[end:]
			nf++
		}
		if nf != 4 {
			return 0, 0, fmt.Errorf("%s line has %d fields, want 4", key, nf)
		}
		n, err := strconv.ParseUint(string(effective), 10, 32)
		if err != nil {
			return 0, 0, fmt.Errorf("%s line: %w", key, err)
		}
		if key == "Uid" && !haveUID {
			uid, haveUID = uint32(n), true
		} else if key == "Gid" && !haveGID {
			gid, haveGID = uint32(n), true
		}
	}
	if !haveUID || !haveGID {
		return 0, 0, errors.New("status lacks a Uid or Gid line")
	}
	return uid, gid, nil
}

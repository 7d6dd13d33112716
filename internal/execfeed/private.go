package execfeed

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// StageArg is the hidden lanyard-agent command that runs Stage: the first
// moments of the child, in its private mount namespace.
const StageArg = "__exec-stage"

// stageFD is the stage's end of the socket to exec (cmd.ExtraFiles[0]).
const stageFD = 3

// stageTimeout bounds how long exec waits for the stage's tmpfs: a mount
// takes microseconds; the bound is for a stage that hangs.
const stageTimeout = 10 * time.Second

// tmpfsOptions: small (a few generations of a few KiB), owner-only, and
// nothing in it is executable, a device or setuid.
const tmpfsOptions = "mode=0700,size=1m,nr_inodes=64"

// ErrNoNamespace wraps why the child could not get a private mount
// namespace with a tmpfs in it.
var ErrNoNamespace = errors.New("no private mount namespace")

// stage is a child held in Stage until release: in its own mount
// namespace, with a tmpfs mounted that exec reaches through dir.
type stage struct {
	cmd  *exec.Cmd
	conn *net.UnixConn
	dir  *os.File
}

// startStage starts cmd (whose Path, Args, Env and stdio name the final
// command) as a Stage of this executable in a new mount namespace, with
// a tmpfs mounted at mountpoint, and returns once the tmpfs is there. As
// root the namespace is a plain CLONE_NEWNS; otherwise a user namespace
// maps only the caller's own uid and gid to themselves, and the stage
// holds CAP_SYS_ADMIN in it just long enough to mount.
func startStage(cmd *exec.Cmd, mountpoint string) (*stage, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("%w: find lanyard-agent's own executable: %v", ErrNoNamespace, err)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: socketpair: %v", ErrNoNamespace, err)
	}
	ours, theirs := os.NewFile(uintptr(pair[0]), "exec"), os.NewFile(uintptr(pair[1]), "stage")
	defer theirs.Close()
	fc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		theirs.Close()
		return nil, fmt.Errorf("%w: socket: %v", ErrNoNamespace, err)
	}
	conn := fc.(*net.UnixConn)
	finalPath, finalArgs := cmd.Path, cmd.Args
	cmd.Path = self
	cmd.Args = append([]string{"lanyard-agent", StageArg, mountpoint, finalPath}, finalArgs...)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = namespaceAttr()
	if err := cmd.Start(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: start %s in a new mount namespace: %v", ErrNoNamespace, finalPath, err)
	}
	theirs.Close()
	s := &stage{cmd: cmd, conn: conn}
	dir, err := s.receive()
	if err != nil {
		s.abort()
		return nil, fmt.Errorf("%w: %v", ErrNoNamespace, err)
	}
	s.dir = dir
	return s, nil
}

// namespaceAttr asks for a new mount namespace; Go then makes "/"
// recursively private in it, so nothing mounted there propagates back.
func namespaceAttr() *syscall.SysProcAttr {
	attr := &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if os.Geteuid() == 0 {
		return attr
	}
	uid, gid := os.Getuid(), os.Getgid()
	attr.Cloneflags = syscall.CLONE_NEWUSER
	attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: uid, HostID: uid, Size: 1}}
	attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: gid, HostID: gid, Size: 1}}
	attr.GidMappingsEnableSetgroups = false
	// Kept across the stage's execve (its uid is not 0 in the namespace),
	// dropped by the stage before it execs the command.
	attr.AmbientCaps = []uintptr{unix.CAP_SYS_ADMIN}
	return attr
}

// receive reads the stage's answer: "ok" with the tmpfs's root as a
// descriptor, or the reason it failed.
func (s *stage) receive() (*os.File, error) {
	if err := s.conn.SetReadDeadline(time.Now().Add(stageTimeout)); err != nil {
		return nil, err
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := s.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, fmt.Errorf("read the stage's answer: %w", err)
	}
	msg := string(buf[:n])
	if msg != "ok" {
		if msg == "" {
			msg = "the stage exited without answering"
		}
		return nil, errors.New(msg)
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(cmsgs) != 1 {
		return nil, fmt.Errorf("the stage sent no descriptor: %v", err)
	}
	fds, err := unix.ParseUnixRights(&cmsgs[0])
	if err != nil || len(fds) != 1 {
		return nil, fmt.Errorf("the stage sent no descriptor: %v", err)
	}
	dir := os.NewFile(uintptr(fds[0]), "files")
	// Whose job: the stage mounted it, but exec is the one about to
	// write a key there; it checks for itself.
	var st unix.Statfs_t
	if err := unix.Fstatfs(fds[0], &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		dir.Close()
		return nil, fmt.Errorf("the stage's directory is not a tmpfs (type 0x%x, %v)", st.Type, err)
	}
	return dir, nil
}

// release lets the stage exec the command.
func (s *stage) release() error {
	defer s.conn.Close()
	if _, err := s.conn.Write([]byte("go")); err != nil {
		return fmt.Errorf("release the command: %w", err)
	}
	return nil
}

// abort ends a stage that was not released, and reaps it.
func (s *stage) abort() {
	s.conn.Close() // the stage reads EOF and exits
	s.cmd.Process.Kill()
	s.cmd.Wait()
}

// Stage is the child's side of a private mount: run by lanyard-agent's
// hidden StageArg command with MOUNTPOINT PATH ARGV..., in the mount
// namespace startStage made. It mounts the tmpfs, hands its root to exec,
// waits until exec has written the first files, then execs PATH with
// ARGV in its place (same PID, same namespace). It returns only on
// failure, with the exit status to use.
func Stage(args []string) int {
	conn := os.NewFile(stageFD, "exec")
	if len(args) < 3 {
		fmt.Fprintf(os.Stderr, "lanyard-agent exec: %s is internal to exec: MOUNTPOINT PATH ARGV...\n", StageArg)
		return 2
	}
	mountpoint, path, argv := args[0], args[1], args[2:]
	dir, err := mountTmpfs(mountpoint)
	if err != nil {
		unix.Sendmsg(stageFD, []byte(err.Error()), nil, nil, 0)
		return 1
	}
	err = unix.Sendmsg(stageFD, []byte("ok"), unix.UnixRights(dir), nil, 0)
	unix.Close(dir)
	if err != nil {
		return 1
	}
	buf := make([]byte, 16)
	n, _ := conn.Read(buf)
	conn.Close()
	if string(buf[:n]) != "go" {
		return 1 // exec gave up (no identity in time, or a signal)
	}
	// The command keeps no capability of the stage's user namespace.
	unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
	err = unix.Exec(path, argv, os.Environ())
	fmt.Fprintf(os.Stderr, "lanyard-agent exec: run %s: %v\n", path, err)
	if errors.Is(err, unix.ENOENT) {
		return ExitNotFound
	}
	return ExitCannotRun
}

// mountTmpfs mounts the files' tmpfs at mountpoint and opens its root.
func mountTmpfs(mountpoint string) (int, error) {
	// Go made "/" private when it unshared; again, in case a future
	// change starts the stage another way.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return -1, fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("lanyard-exec", mountpoint, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, tmpfsOptions); err != nil {
		return -1, fmt.Errorf("mount a tmpfs at %s: %w", mountpoint, err)
	}
	fd, err := unix.Open(mountpoint, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", mountpoint, err)
	}
	return fd, nil
}

package workload

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// attestorNames are the attestors Config.Attestors may name,
// in the order their selectors are gathered. Each derives the selectors of
// the type it is named after.
var attestorNames = [...]string{"unix", "systemd", "cgroup", "container", "k8s"}

// Attestors returns the names Config.Attestors accepts, in
// the order their selectors are gathered.
func Attestors() []string { return slices.Clone(attestorNames[:]) }

// Config chooses what a Workload attests.
type Config struct {
	// Attestors names the workload attestors to run: "unix" (unix:uid,
	// gid, user, group, path, sha256), "systemd" (systemd:unit), "cgroup"
	// (cgroup:path), "container" (container:id) and "k8s" (k8s:pod-uid).
	// Empty means all of them.
	Attestors []string
	// HashCacheSize bounds how many executable hashes are remembered;
	// 0 means 1024.
	HashCacheSize int
}

// Workload is the agent's workload attestor: it turns a caller of the
// Workload API into the selectors its entries are matched against. It is
// safe for concurrent use, and keeps a bounded cache of executable hashes.
type Workload struct {
	sources []selectorSource
	// afterRead, when set (by tests only), runs between the reads and
	// the re-check, where a caller that exits does the most harm.
	afterRead func()
}

// selectorSource is one workload attestor: a plain type that reads what it
// needs from /proc/<pid> of a caller pinned by attestWorkload and derives its
// selectors. attestWorkload re-checks the caller after every source has read.
type selectorSource interface {
	selectors(c *caller) ([]string, error)
}

// caller is a Process being attested.
type caller struct {
	Process
	dir string    // /proc/<pid>
	ids *idReader // nil: kernelIDs; tests pass their own
}

// New returns a Workload running the attestors cfg names. An
// unknown or repeated name is an error.
func New(cfg Config) (*Workload, error) {
	names := cfg.Attestors
	if len(names) == 0 {
		names = attestorNames[:]
	}
	on := make(map[string]bool, len(names))
	for _, n := range names {
		if !slices.Contains(attestorNames[:], n) {
			return nil, fmt.Errorf("unknown workload attestor %q (want %s)", n, strings.Join(attestorNames[:], ", "))
		}
		if on[n] {
			return nil, fmt.Errorf("workload attestor %q is listed twice", n)
		}
		on[n] = true
	}
	size := cfg.HashCacheSize
	switch {
	case size < 0:
		return nil, fmt.Errorf("hash cache size %d is negative", size)
	case size == 0:
		size = defaultHashCacheSize
	}

	w := &Workload{}
	if on["unix"] {
		u := unixAttestor{hashes: newExeHashes(size)}
		if cacheIDNames {
			u.names = newIDNames()
		}
		w.sources = append(w.sources, u)
	}
	cg := cgroupAttestor{unit: on["systemd"], path: on["cgroup"], container: on["container"], pod: on["k8s"]}
	if cg != (cgroupAttestor{}) {
		w.sources = append(w.sources, cg)
	}
	return w, nil
}

// Attest returns the caller's selectors, sorted and without duplicates.
//
// It reads /proc/<pid> (exe, cgroup, as the attestors need) and then
// confirms that the process that connected still has the uid, gid (asked
// through p.PIDFD, or /proc/<pid>/status on kernels before 6.13) and
// executable (p.Exe) it connected with and, through p.PIDFD last, that it
// is still alive. Otherwise nothing read is used: the error wraps ErrCallerExited,
// ErrCallerChanged or ErrCallerExeced. An
// executable that was deleted is an error wrapping ErrExeDeleted. A name or
// path no selector could express only leaves its selector out.
func (w *Workload) Attest(ctx context.Context, p Process) ([]string, error) {
	return attestWorkload(ctx, p, w.sources, w.afterRead)
}

func attestWorkload(ctx context.Context, p Process, sources []selectorSource, afterRead func()) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("attest pid %d: %w", p.PID, err)
	}
	if p.PIDFD == nil {
		fd, err := openPIDFD(p.PID)
		if err != nil {
			return nil, fmt.Errorf("attest pid %d: pin: %w", p.PID, err)
		}
		defer fd.Close()
		p.PIDFD = fd
	}
	c := &caller{Process: p, dir: procDir(p.PID)}

	sels, readErr := c.read(sources)
	if afterRead != nil {
		afterRead()
	}
	// Confirm even when a read failed: a read that failed because the
	// caller exited is reported as the exit, not as the read.
	if err := c.confirm(true); err != nil {
		return nil, fmt.Errorf("attest pid %d: %w", p.PID, err)
	}
	if readErr != nil {
		return nil, fmt.Errorf("attest pid %d: %w", p.PID, readErr)
	}
	slices.Sort(sels)
	return slices.Compact(sels), nil
}

// read gathers every source's selectors. The uid and gid are checked once,
// in confirm: no selector read here depends on them, and only their value
// at the end decides.
func (c *caller) read(sources []selectorSource) ([]string, error) {
	var sels []string
	for _, s := range sources {
		got, err := s.selectors(c)
		if err != nil {
			return nil, err
		}
		sels = append(sels, got...)
	}
	return sels, nil
}

// confirm proves that everything read came from the process that
// connected, and that it is still who it connected as: the same
// executable (when Exe was recorded) and the same uid and gid. withStart
// also re-reads the start time when PinPID recorded one, a second witness
// for attestation; Recheck, which runs before every push on a stream, and
// a caller pinned by SO_PEERPIDFD (Identify) leave it to the pidfd.
//
// Why this makes PID reuse harmless: PIDFD refers to a process, not a
// number. The kernel hands a PID out again only after its process has
// exited and been reaped, and a pidfd reports the exit before the reaping.
// So if the pidfd shows the process alive after the last read, the PID
// named that process from the moment the pidfd was taken until now, and
// every /proc/<pid> file was that process's. The liveness check therefore
// comes last; checking before reading would leave the window open.
func (c *caller) confirm(withStart bool) error {
	var startErr error
	if withStart && c.StartTime != 0 {
		st, err := readStartTime(c.dir)
		switch {
		case err != nil:
			startErr = err
		case st != c.StartTime:
			startErr = fmt.Errorf("%w: start time changed from %d to %d", ErrCallerExited, c.StartTime, st)
		}
	}
	exeErr := c.checkExe()
	idsErr := c.checkIDs()
	if err := checkAlive(c.PIDFD); err != nil {
		return err
	}
	return exiting(errors.Join(startErr, exeErr, idsErr))
}

// checkExe compares the executable /proc/<pid>/exe leads to with the one
// recorded when the process was pinned. Exec keeps the PID, the pidfd and
// the start time; only the executable tells that another program runs.
func (c *caller) checkExe() error {
	if c.Exe == (FileID{}) {
		return nil
	}
	exe, err := readExeID(c.dir)
	if err != nil {
		return err
	}
	if exe != c.Exe {
		return fmt.Errorf("%w: connected running file %s, now %s", ErrCallerExeced, c.Exe, exe)
	}
	return nil
}

// checkIDs compares the caller's effective uid and gid now (from its pidfd,
// or /proc/<pid>/status: idReader) with those SO_PEERCRED recorded at
// connect.
func (c *caller) checkIDs() error {
	ids := c.ids
	if ids == nil {
		ids = &kernelIDs
	}
	uid, gid, err := ids.read(c.dir, c.PIDFD)
	if err != nil {
		return err
	}
	if uid != c.UID || gid != c.GID {
		return fmt.Errorf("%w: connected as uid %d gid %d, now uid %d gid %d", ErrCallerChanged, c.UID, c.GID, uid, gid)
	}
	return nil
}

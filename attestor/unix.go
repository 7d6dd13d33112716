package attestor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ErrExeDeleted reports that the caller's executable was unlinked (or
// replaced) after the process started: the path it was started from no
// longer names the code it runs, so it must not earn a unix:path selector.
var ErrExeDeleted = errors.New("executable was deleted")

// deletedSuffix is what the kernel appends to /proc/<pid>/exe when the
// binary's directory entry is gone.
const deletedSuffix = " (deleted)"

// Unix derives the unix:* selectors of a caller: its uid and gid as the
// kernel reported them on the socket, their names, and the path of the
// executable it runs.
type Unix struct {
	// ProcRoot is where procfs is mounted; "" means "/proc".
	ProcRoot string
}

// procInfo is what one attestation reads from /proc/<pid>. Everything a
// selector needs from /proc is gathered here in one pass, so that later
// selectors (exe sha256, cgroup) and the PID re-check see the same process.
type procInfo struct {
	exe string
}

// Attest returns the caller's selectors, sorted: unix:uid:<n> and
// unix:gid:<n> from p (SO_PEERCRED, not /proc, so a setuid after connect
// does not change them), unix:user:<name> and unix:group:<name> when those
// ids have names, and unix:path:<exe>. A name that does not resolve only
// leaves its selector out, which can only narrow what the caller is given.
// An executable that was deleted is an error wrapping ErrExeDeleted.
func (u Unix) Attest(ctx context.Context, p Process) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("attest pid %d: %w", p.PID, err)
	}
	info, err := u.readProc(p.PID)
	if err != nil {
		return nil, fmt.Errorf("attest pid %d: %w", p.PID, err)
	}

	uid := strconv.FormatUint(uint64(p.UID), 10)
	gid := strconv.FormatUint(uint64(p.GID), 10)
	sels := []string{
		"unix:uid:" + uid,
		"unix:gid:" + gid,
		"unix:path:" + info.exe,
	}
	if usr, err := user.LookupId(uid); err == nil {
		sels = append(sels, "unix:user:"+usr.Username)
	}
	if grp, err := user.LookupGroupId(gid); err == nil {
		sels = append(sels, "unix:group:"+grp.Name)
	}
	slices.Sort(sels)
	return sels, nil
}

// readProc reads what the selectors need from /proc/<pid>.
func (u Unix) readProc(pid int32) (procInfo, error) {
	root := u.ProcRoot
	if root == "" {
		root = "/proc"
	}
	dir := filepath.Join(root, strconv.FormatInt(int64(pid), 10))

	exe, err := os.Readlink(filepath.Join(dir, "exe"))
	if err != nil {
		return procInfo{}, fmt.Errorf("read exe: %w", err)
	}
	// A file whose real name ends in " (deleted)" is refused too: the
	// kernel's marker cannot be told apart from it, and refusing fails closed.
	if trimmed, ok := strings.CutSuffix(exe, deletedSuffix); ok {
		return procInfo{}, fmt.Errorf("read exe: %s: %w", trimmed, ErrExeDeleted)
	}
	return procInfo{exe: exe}, nil
}

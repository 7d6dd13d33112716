package workload

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"

	"github.com/lanyard-dev/lanyard/selector"
)

// ErrExeDeleted reports that the caller's executable was unlinked (or
// replaced) after the process started: the path it was started from no
// longer names the code it runs, so it must not earn a unix:path selector.
var ErrExeDeleted = errors.New("executable was deleted")

// deletedSuffix is what the kernel appends to /proc/<pid>/exe when the
// binary's directory entry is gone.
const deletedSuffix = " (deleted)"

// unixAttestor derives the unix:* selectors: the uid and gid the kernel
// recorded on the socket (Attest checks that the kernel's current ids
// agree), their names, the executable's path and, with hashes, its
// SHA-256. A value that a policy could not express (a name with a space, a
// path with a control character) leaves its selector out, which can only
// narrow what the caller is given.
type unixAttestor struct {
	hashes *exeHashes // nil: no unix:sha256
	names  *idNames   // nil: every call looks names up
}

// lookupNames returns the user and group names of uid and gid, "" for
// none, through names when it is set.
func lookupNames(names *idNames, uid, gid string) (userName, groupName string) {
	if names != nil {
		return names.user(uid), names.groupName(gid)
	}
	if u, err := user.LookupId(uid); err == nil {
		userName = u.Username
	}
	if g, err := user.LookupGroupId(gid); err == nil {
		groupName = g.Name
	}
	return userName, groupName
}

func (a unixAttestor) selectors(c *caller) ([]string, error) {
	uid := strconv.FormatUint(uint64(c.UID), 10)
	gid := strconv.FormatUint(uint64(c.GID), 10)
	sels := []string{selector.UnixUID + uid, selector.UnixGID + gid}
	// Names come from the agent's user database (/etc/passwd and
	// /etc/group without cgo): a caller in a container is named by the
	// host, whose ids the kernel reported.
	// With names set they are cached per version of those files
	// (idnames.go).
	userName, groupName := lookupNames(a.names, uid, gid)
	if userName != "" && selector.ValidValue(selector.UnixUser, userName) {
		sels = append(sels, selector.UnixUser+userName)
	}
	if groupName != "" && selector.ValidValue(selector.UnixGroup, groupName) {
		sels = append(sels, selector.UnixGroup+groupName)
	}

	// Readlink and open go through the same /proc/<pid>/exe: the open
	// follows the kernel's own reference to the running binary, so the
	// hash is of the code that runs even if its path now names another file.
	exe, err := os.Readlink(c.dir + "/exe")
	if err != nil {
		return nil, fmt.Errorf("read exe: %w", err)
	}
	// A file whose real name ends in " (deleted)" is refused too: the
	// kernel's marker cannot be told apart from it, and refusing fails closed.
	if trimmed, ok := strings.CutSuffix(exe, deletedSuffix); ok {
		return nil, fmt.Errorf("read exe: %s: %w", trimmed, ErrExeDeleted)
	}
	if selector.ValidValue(selector.UnixPath, exe) {
		sels = append(sels, selector.UnixPath+exe)
	}
	if a.hashes != nil {
		sum, err := a.hashes.sum(c.dir + "/exe")
		if err != nil {
			return nil, err
		}
		sels = append(sels, selector.UnixSHA256+sum)
	}
	return sels, nil
}

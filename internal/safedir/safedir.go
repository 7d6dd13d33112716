// Package safedir decides whether a directory is safe to hold a socket that
// others must not be able to replace: the Workload API socket, which every
// local user connects to and trusts, and the root-only admin socket.
//
// A socket can be squatted or swapped by whoever may write its directory,
// or any directory above it (renaming a parent replaces the whole subtree).
// So the socket's own directory and each of its ancestors must be owned by
// root (or by the user the agent runs as, for unprivileged test agents),
// and none may be writable by other users. An ancestor that is writable by
// everyone but sticky (/tmp) is allowed: there, only an entry's owner may
// rename or remove it, and the entry below it must pass the same checks.
// The socket's own directory may not be writable by others even when
// sticky, since anyone could then create the socket's name first.
package safedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrUnsafe is wrapped by Check's refusals.
var ErrUnsafe = errors.New("directory could be written by a user other than root")

// Check returns nil when dir, and every directory above it, is safe to hold
// a socket that only root may replace (see the package doc); otherwise an
// error that wraps ErrUnsafe and names the directory, its owner and mode.
// Symbolic links are checked where they are and where they lead.
func Check(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if err := checkChain(abs, false); err != nil {
		return err
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if real != abs {
		return checkChain(real, true)
	}
	return nil
}

// checkChain checks dir and its ancestors as they are named, without
// following a final symbolic link (followed says the path is resolved).
func checkChain(dir string, followed bool) error {
	euid := uint32(os.Geteuid())
	for d, leaf := dir, true; ; d, leaf = filepath.Dir(d), false {
		var st unix.Stat_t
		if err := unix.Lstat(d, &st); err != nil {
			return fmt.Errorf("check %s: %w", d, err)
		}
		isLink := st.Mode&unix.S_IFMT == unix.S_IFLNK
		if !isLink || followed {
			if err := checkOne(d, &st, leaf, euid); err != nil {
				return err
			}
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}

func checkOne(d string, st *unix.Stat_t, leaf bool, euid uint32) error {
	mode := st.Mode & 0o7777
	if st.Uid != 0 && st.Uid != euid {
		return fmt.Errorf("%s is owned by uid %d (mode %04o): %w", d, st.Uid, mode, ErrUnsafe)
	}
	othersWrite := mode&0o002 != 0 || (mode&0o020 != 0 && st.Gid != 0)
	sticky := mode&unix.S_ISVTX != 0
	if othersWrite && (leaf || !sticky) {
		return fmt.Errorf("%s is writable by other users (owner %d, group %d, mode %04o): %w", d, st.Uid, st.Gid, mode, ErrUnsafe)
	}
	return nil
}

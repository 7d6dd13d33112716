package execfeed

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrNotMemory is returned for a directory whose file system keeps its
// content on a disk: the files exec writes hold a private key.
var ErrNotMemory = errors.New("not on a memory file system (tmpfs or ramfs)")

// checkMemory refuses path unless its file system lives in memory only.
func checkMemory(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	switch st.Type {
	case unix.TMPFS_MAGIC, unix.RAMFS_MAGIC:
		return nil
	}
	return fmt.Errorf("%s: %w (file system type 0x%x)", path, ErrNotMemory, st.Type)
}

// memoryDir makes a fresh 0700 directory for the files in a memory file
// system: under $XDG_RUNTIME_DIR when that is one, else under /dev/shm.
// base overrides both (tests); it is checked all the same.
func memoryDir(base string) (string, error) {
	candidates := []string{base}
	if base == "" {
		candidates = []string{os.Getenv("XDG_RUNTIME_DIR"), "/dev/shm"}
	}
	var errs []error
	for _, c := range candidates {
		if c == "" {
			continue
		}
		if err := checkMemory(c); err != nil {
			errs = append(errs, err)
			continue
		}
		dir, err := os.MkdirTemp(c, "lanyard-exec-")
		if err != nil {
			return "", fmt.Errorf("make the files' directory: %w", err)
		}
		// The umask may have taken bits: the owner must write, no one else read.
		if err := os.Chmod(dir, 0o700); err != nil {
			os.Remove(dir)
			return "", fmt.Errorf("make the files' directory: %w", err)
		}
		return dir, nil
	}
	return "", fmt.Errorf("no memory file system for the files: %w", errors.Join(errs...))
}

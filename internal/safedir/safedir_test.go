package safedir

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCheck(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: makes directories owned by another uid")
	}
	base := t.TempDir() // 0700, root's
	mk := func(t *testing.T, path string, mode uint32, uid int) string {
		t.Helper()
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := unix.Chmod(path, mode); err != nil { // os.Chmod would drop the sticky bit
			t.Fatal(err)
		}
		if err := os.Chown(path, uid, 0); err != nil {
			t.Fatal(err)
		}
		return path
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the directory to check
		ok    bool
	}{
		{name: "root-owned 0755", setup: func(t *testing.T, d string) string { return mk(t, d+"/a", 0o755, 0) }, ok: true},
		{name: "root-owned 0700", setup: func(t *testing.T, d string) string { return mk(t, d+"/a", 0o700, 0) }, ok: true},
		{name: "world-writable", setup: func(t *testing.T, d string) string { return mk(t, d+"/a", 0o777, 0) }},
		{name: "world-writable and sticky", setup: func(t *testing.T, d string) string { return mk(t, d+"/a", 0o1777, 0) }},
		{name: "group-writable by a non-root group", setup: func(t *testing.T, d string) string {
			p := mk(t, d+"/a", 0o775, 0)
			os.Chown(p, 0, 100)
			return p
		}},
		{name: "owned by another user", setup: func(t *testing.T, d string) string { return mk(t, d+"/a", 0o755, 65534) }},
		{name: "under a sticky world-writable parent (/tmp)", setup: func(t *testing.T, d string) string {
			mk(t, d+"/tmp", 0o1777, 0)
			return mk(t, d+"/tmp/a", 0o755, 0)
		}, ok: true},
		{name: "under a world-writable parent", setup: func(t *testing.T, d string) string {
			mk(t, d+"/open", 0o777, 0)
			return mk(t, d+"/open/a", 0o755, 0)
		}},
		{name: "under a parent owned by another user", setup: func(t *testing.T, d string) string {
			mk(t, d+"/theirs", 0o755, 65534)
			return mk(t, d+"/theirs/a", 0o755, 0)
		}},
		{name: "symlink to a world-writable directory", setup: func(t *testing.T, d string) string {
			mk(t, d+"/open", 0o777, 0)
			os.Symlink(d+"/open", d+"/link")
			return d + "/link"
		}},
		{name: "symlink to a safe directory", setup: func(t *testing.T, d string) string {
			mk(t, d+"/safe", 0o755, 0)
			os.Symlink(d+"/safe", d+"/link")
			return d + "/link"
		}, ok: true},
		{name: "missing", setup: func(t *testing.T, d string) string { return d + "/nope" }},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := filepath.Join(base, string(rune('a'+i)))
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			err := Check(tc.setup(t, d))
			if tc.ok && err != nil {
				t.Errorf("Check = %v, want nil", err)
			}
			if !tc.ok && err == nil {
				t.Error("Check = nil, want a refusal")
			}
			if !tc.ok && tc.name != "missing" && !errors.Is(err, ErrUnsafe) {
				t.Errorf("Check = %v, want ErrUnsafe", err)
			}
		})
	}
}

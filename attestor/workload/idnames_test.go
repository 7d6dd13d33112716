package workload

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestIDNames: a name is looked up once per version of its file, again
// after the file changes, and every time while the file is too fresh to
// trust its timestamps or when the lookup failed.
func TestIDNames(t *testing.T) {
	type step struct {
		write       string // new content of the passwd file before the call; "" leaves it
		id          string
		want        string
		wantLookups int // lookups made so far
	}
	tests := []struct {
		name   string
		settle time.Duration
		fail   bool // the lookup fails
		steps  []step
	}{
		{name: "cached per version", steps: []step{
			{id: "1000", want: "alice", wantLookups: 1},
			{id: "1000", want: "alice", wantLookups: 1},
			{id: "1001", want: "bob", wantLookups: 2},
			{id: "1001", want: "bob", wantLookups: 2},
		}},
		{name: "a changed file is read again", steps: []step{
			{id: "1000", want: "alice", wantLookups: 1},
			{write: "carol:x:1000:1000::/:/bin/sh\n", id: "1000", want: "carol", wantLookups: 2},
			{id: "1000", want: "carol", wantLookups: 2},
		}},
		{name: "an id without a name is cached too", steps: []step{
			{id: "4242", want: "", wantLookups: 1},
			{id: "4242", want: "", wantLookups: 1},
		}},
		{name: "a fresh file is not cached from", settle: time.Hour, steps: []step{
			{id: "1000", want: "alice", wantLookups: 1},
			{id: "1000", want: "alice", wantLookups: 2},
		}},
		{name: "a failed lookup is not cached", fail: true, steps: []step{
			{id: "1000", want: "", wantLookups: 1},
			{id: "1000", want: "", wantLookups: 2},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			passwd := filepath.Join(t.TempDir(), "passwd")
			write := func(content string) {
				if err := os.WriteFile(passwd, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			write("alice:x:1000:1000::/:/bin/sh\nbob:x:1001:1001::/:/bin/sh\n")
			n := newIDNames()
			n.settle, n.passwd = tc.settle, passwd
			n.lookupUser = func(id string) (string, error) {
				if tc.fail {
					return "", errors.New("read /etc/passwd: permission denied")
				}
				b, err := os.ReadFile(passwd)
				if err != nil {
					return "", err
				}
				for line := range strings.Lines(string(b)) {
					if f := strings.Split(line, ":"); len(f) > 2 && f[2] == id {
						return f[0], nil
					}
				}
				return "", nil
			}
			for i, s := range tc.steps {
				if s.write != "" {
					write(s.write)
				}
				if got := n.user(s.id); got != s.want {
					t.Fatalf("step %d: user(%s) = %q, want %q", i, s.id, got, s.want)
				}
				n.mu.Lock()
				lookups := n.userLookups
				n.mu.Unlock()
				if lookups != s.wantLookups {
					t.Fatalf("step %d: %d lookups, want %d", i, lookups, s.wantLookups)
				}
			}
		})
	}
}

// TestIDNamesMatchLookup: through the cache, the attestor's names for this
// process's ids are those os/user gives.
func TestIDNamesMatchLookup(t *testing.T) {
	uid, gid := itoa(os.Geteuid()), itoa(os.Getegid())
	wantUser, wantGroup := lookupNames(nil, uid, gid)
	n := newIDNames()
	for range 2 {
		if u, g := lookupNames(n, uid, gid); u != wantUser || g != wantGroup {
			t.Fatalf("cached names %q, %q; os/user says %q, %q", u, g, wantUser, wantGroup)
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

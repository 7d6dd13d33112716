package execfeed

import (
	"crypto/tls"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
)

// pairs returns n generations of files, each a real certificate and its
// key (PEM), so that a reader can tell a matching pair from a mix.
func pairs(t *testing.T, n int) []Files {
	t.Helper()
	ca := testca.New(t, "ca", spiffeid.RequireTrustDomainFromString("example.org"))
	bundle := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
	var out []Files
	for range n {
		cert, key := ca.SVID(t, spiffeid.RequireFromString("spiffe://example.org/w"), nil)
		out = append(out, Files{
			Cert:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
			Key:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: testca.PKCS8(t, key)}),
			Bundle: bundle,
		})
	}
	return out
}

// testStore is a Store on a fresh directory in a memory file system.
func testStore(t *testing.T) (*Store, string) {
	t.Helper()
	dir, err := memoryDir("")
	if err != nil {
		t.Skipf("no memory file system here: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return newStore(f, dir), dir
}

func envMap(env []string) map[string]string {
	m := map[string]string{}
	for _, e := range env {
		k, v, _ := strings.Cut(e, "=")
		m[k] = v
	}
	return m
}

// TestSwitchIsAtomic: while generations are switched as fast as the
// store can, readers that pin "current" once and open cert and key
// through it always find a matching pair, never a half-written file; and
// a reader that opens the files after a Switch returns gets exactly that
// generation. Writing the files in place would fail both.
func TestSwitchIsAtomic(t *testing.T) {
	s, dir := testStore(t)
	gens := pairs(t, 8)
	env := envMap(s.Env(false))
	if err := s.Switch(gens[0]); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var reads, mixes atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for !stop.Load() {
				d, err := os.Open(filepath.Join(dir, currentLink))
				if err != nil {
					continue // between a switch and a retire: try again
				}
				cert, cerr := readAt(d, certName)
				key, kerr := readAt(d, keyName)
				d.Close()
				if cerr != nil || kerr != nil {
					continue // retired under the reader: it opens again
				}
				reads.Add(1)
				if _, err := tls.X509KeyPair(cert, key); err != nil {
					mixes.Add(1)
				}
			}
		})
	}
	for i := 1; i < 300; i++ {
		g := gens[i%len(gens)]
		if err := s.Switch(g); err != nil {
			t.Fatal(err)
		}
		// A reader opening after the switch: the new generation, whole.
		cert, err := os.ReadFile(env[EnvCert])
		if err != nil {
			t.Fatal(err)
		}
		key, err := os.ReadFile(env[EnvKey])
		if err != nil {
			t.Fatal(err)
		}
		if string(cert) != string(g.Cert) || string(key) != string(g.Key) {
			t.Fatalf("switch %d: the files are not the generation just written", i)
		}
		if i%3 == 0 {
			if err := s.Retire(); err != nil {
				t.Fatal(err)
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	if mixes.Load() > 0 {
		t.Errorf("%d of %d pinned reads found a certificate and key of different generations", mixes.Load(), reads.Load())
	}
	if reads.Load() == 0 {
		t.Error("the readers read nothing")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("Close left %d entries in %s", len(left), dir)
	}
}

func readAt(d *os.File, name string) ([]byte, error) {
	fd, err := unix.Openat(int(d.Fd()), name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	var b [8192]byte
	n, err := f.Read(b[:])
	return b[:n], err
}

// TestStoreLayout: owner-only modes whatever the umask, the JWT file only
// when asked for, and Retire keeping only the current generation.
func TestStoreLayout(t *testing.T) {
	old := unix.Umask(0o077 | 0o200)
	defer unix.Umask(old)
	s, dir := testStore(t)
	gens := pairs(t, 3)
	gens[2].JWT = []byte("token")
	for _, g := range gens {
		if err := s.Switch(g); err != nil {
			t.Fatal(err)
		}
	}
	env := envMap(s.Env(true))
	tests := []struct {
		path string
		mode os.FileMode
	}{
		{dir, 0o700 | os.ModeDir},
		{filepath.Dir(env[EnvCert]), 0o700 | os.ModeDir},
		{env[EnvCert], 0o600},
		{env[EnvKey], 0o600},
		{env[EnvBundle], 0o600},
		{env[EnvJWT], 0o600},
	}
	for _, tc := range tests {
		t.Run(filepath.Base(tc.path), func(t *testing.T) {
			fi, err := os.Stat(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode() != tc.mode {
				t.Errorf("%s: mode %v, want %v", tc.path, fi.Mode(), tc.mode)
			}
			if st := fi.Sys().(*syscall.Stat_t); int(st.Uid) != os.Geteuid() {
				t.Errorf("%s: owner %d, want %d", tc.path, st.Uid, os.Geteuid())
			}
		})
	}
	if b, _ := os.ReadFile(env[EnvJWT]); string(b) != "token" {
		t.Errorf("jwt file = %q", b)
	}
	if _, ok := envMap(s.Env(false))[EnvJWT]; ok {
		t.Error("LANYARD_JWT_FILE set without an audience")
	}
	if err := s.Retire(); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if got := strings.Join(names, " "); got != "current g3" {
		t.Errorf("after Retire: %s, want current g3", got)
	}
}

// TestMemoryCheck: a disk-backed directory is refused, by name, and no
// directory is made there; a tmpfs is accepted.
func TestMemoryCheck(t *testing.T) {
	disk := t.TempDir()
	if checkMemory(disk) == nil {
		disk = "/" // TMPDIR is a tmpfs here; the root is on a disk
	}
	if err := checkMemory(disk); !errors.Is(err, ErrNotMemory) {
		t.Errorf("checkMemory(%s) = %v, want ErrNotMemory", disk, err)
	}
	if dir, err := memoryDir(t.TempDir()); !errors.Is(err, ErrNotMemory) || dir != "" {
		t.Errorf("memoryDir(disk) = %q, %v; want ErrNotMemory", dir, err)
	}
	if checkMemory("/dev/shm") != nil {
		t.Skip("/dev/shm is no tmpfs here")
	}
	dir, err := memoryDir("/dev/shm")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("memoryDir made %s: %v, %v; want mode 0700", dir, fi.Mode(), err)
	}
}

package workload

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

func writeRandom(t *testing.T, path string, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// sumFile opens path and hashes it through h, as an attestation does.
func sumFile(t *testing.T, h *exeHashes, path string) string {
	t.Helper()
	s, err := h.sum(path)
	if err != nil {
		t.Fatalf("sum %s: %v", path, err)
	}
	return s
}

// TestExeHashesOneRead: many callers hashing one big file at once, and
// again later, cost one read of it.
func TestExeHashesOneRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big")
	want := writeRandom(t, path, 32<<20)
	h := newExeHashes(defaultHashCacheSize)
	h.settle = 0

	const callers = 32
	var wg sync.WaitGroup
	sums := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() { sums[i], errs[i] = h.sum(path) })
	}
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || sums[i] != want {
			t.Fatalf("caller %d: sum = %s, %v; want %s", i, sums[i], errs[i], want)
		}
	}
	if got := sumFile(t, h, path); got != want {
		t.Fatalf("cached sum = %s, want %s", got, want)
	}
	if n := h.reads.Load(); n != 1 {
		t.Errorf("file read %d times, want once", n)
	}
}

func TestExeHashesEvictsLeastRecentlyUsed(t *testing.T) {
	dir := t.TempDir()
	a, b, c := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "c")
	for _, p := range []string{a, b, c} {
		writeRandom(t, p, 1024)
	}
	h := newExeHashes(2)
	h.settle = 0
	steps := []struct {
		path      string
		wantReads int64
	}{
		{a, 1}, {b, 2}, {a, 2}, // a is now the most recent
		{c, 3},         // evicts b
		{a, 3}, {c, 3}, // both still cached
		{b, 4}, // read again
	}
	for i, s := range steps {
		sumFile(t, h, s.path)
		if got := h.reads.Load(); got != s.wantReads {
			t.Fatalf("step %d (%s): %d reads, want %d", i, filepath.Base(s.path), got, s.wantReads)
		}
		if h.len() > 2 {
			t.Fatalf("step %d: cache holds %d sums, bound is 2", i, h.len())
		}
	}
}

// TestExeHashesNewVersion: rewriting a file with new bytes of the same size
// and putting its mtime back still yields the new hash (ctime moved).
func TestExeHashesNewVersion(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "exe")
	first := writeRandom(t, path, 4096)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	h := newExeHashes(defaultHashCacheSize)
	h.settle = 0
	if got := sumFile(t, h, path); got != first {
		t.Fatalf("sum = %s, want %s", got, first)
	}

	// The kernel may stamp ctime from a coarse clock: wait until a new
	// write gets a later ctime, or the test would prove nothing.
	firstKey := statKey(t, path)
	probe := filepath.Join(dir, "probe")
	deadline := time.Now().Add(5 * time.Second)
	for {
		writeRandom(t, probe, 1)
		if statKey(t, probe).ctime > firstKey.ctime {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ctime did not advance within 5s")
		}
		time.Sleep(time.Millisecond)
	}
	second := writeRandom(t, path, 4096)
	if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if k := statKey(t, path); k.mtime != firstKey.mtime || k.size != firstKey.size || k.ino != firstKey.ino {
		t.Fatalf("rewrite changed more than ctime: %+v, was %+v", k, firstKey)
	}
	if got := sumFile(t, h, path); got != second {
		t.Fatalf("sum after rewrite = %s, want the new content's %s", got, second)
	}
}

// TestExeHashesFreshFileNotCached: a file changed moments ago is hashed on
// every call, until its ctime has settled.
func TestExeHashesFreshFileNotCached(t *testing.T) {
	path := filepath.Join(t.TempDir(), "exe")
	writeRandom(t, path, 4096)
	h := newExeHashes(defaultHashCacheSize)
	sumFile(t, h, path)
	sumFile(t, h, path)
	if n := h.reads.Load(); n != 2 {
		t.Errorf("fresh file read %d times in two calls, want 2", n)
	}
	if h.len() != 0 {
		t.Errorf("cache holds %d sums, want none", h.len())
	}
}

func statKey(t *testing.T, path string) exeKey {
	t.Helper()
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	k, ok, err := fdKey(fd)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Skip("no stat details on this platform")
	}
	return k
}

// TestExeHashesHitStatsOnly: a cached version is answered from a stat of
// the path alone. A Unix socket can be stat'ed but not opened (ENXIO), so
// a sum that opened the file would fail here.
func TestExeHashesHitStatsOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	h := newExeHashes(4)
	if _, err := h.sum(path); err == nil {
		t.Fatal("sum of an uncached socket succeeded; want the open's error")
	}
	key, ok, err := pathKey(path)
	if err != nil || !ok {
		t.Fatalf("pathKey: %v, %v", ok, err)
	}
	h.put(key, "cached")
	if s, err := h.sum(path); err != nil || s != "cached" {
		t.Fatalf("sum of a cached version = %q, %v; want the cached sum without an open", s, err)
	}
}

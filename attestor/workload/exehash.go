package workload

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lanyard-dev/lanyard/internal/lru"
	"golang.org/x/sync/singleflight"
)

// defaultHashCacheSize bounds the exe hash cache when Config leaves
// it 0: a host runs far fewer distinct binaries than this.
const defaultHashCacheSize = 1024

// hashSettle is how long after its last change a file's hash may be
// cached. Kernels before multigrain timestamps (6.13) stamp ctime from a
// coarse clock, so two writes a few milliseconds apart can leave the same
// key; a sum taken between them must not outlive the second.
const hashSettle = 2 * time.Second

// errExeChanged reports a file that changed while it was hashed: the sum
// is of no version of it, so it is neither used nor cached.
var errExeChanged = errors.New("executable changed while it was hashed")

// exeKey names one version of a file: the same key, the same bytes.
type exeKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // nanoseconds
}

func (k exeKey) String() string {
	return fmt.Sprintf("%d:%d:%d:%d:%d", k.dev, k.ino, k.size, k.mtime, k.ctime)
}

// exeHashes computes the SHA-256 of executables at most once per version
// of each file. Callers hashing the same version at once share one read,
// so a huge binary costs one read however many of its processes call. The
// cache holds at most max sums and forgets the least recently used first.
type exeHashes struct {
	settle time.Duration // see hashSettle; tests shorten it
	group  singleflight.Group
	reads  atomic.Int64 // files read in full, for tests

	mu   sync.Mutex
	sums *lru.Cache[exeKey, string] // under mu
}

func newExeHashes(max int) *exeHashes {
	return &exeHashes{settle: hashSettle, sums: lru.New[exeKey, string](max)}
}

// sum returns the hex SHA-256 of the executable at path (the caller's
// /proc/<pid>/exe). A cached version costs one stat of path, which
// follows the link to the very file the process runs, as an open would;
// hashing is not interruptible, but it is one read per file version,
// shared by every caller.
func (h *exeHashes) sum(path string) (string, error) {
	if key, ok, err := pathKey(path); err == nil && ok {
		if s, ok := h.get(key); ok {
			return s, nil
		}
	}
	// Not cached (or the stat failed: the open says why): hash what the
	// open finds, keyed by its own fstat.
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open exe: %w", &fs.PathError{Op: "open", Path: path, Err: err})
	}
	defer syscall.Close(fd)
	key, ok, err := fdKey(fd)
	if err != nil {
		return "", fmt.Errorf("hash exe: %w", err)
	}
	if !ok {
		return h.hash(fd, key, false)
	}
	if s, ok := h.get(key); ok {
		return s, nil
	}
	v, err, _ := h.group.Do(key.String(), func() (any, error) {
		// A flight for this key may have finished since the miss above.
		if s, ok := h.get(key); ok {
			return s, nil
		}
		s, err := h.hash(fd, key, true)
		if err == nil && time.Since(time.Unix(0, key.ctime)) >= h.settle {
			h.put(key, s)
		}
		return s, err
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

// hash reads the file open as fd in full. With check, it refuses a file
// whose key changed during the read.
func (h *exeHashes) hash(fd int, key exeKey, check bool) (string, error) {
	h.reads.Add(1)
	d := sha256.New()
	buf := make([]byte, 256<<10)
	// pread, so that the sum never depends on the descriptor's offset.
	for off := int64(0); ; {
		n, err := syscall.Pread(fd, buf, off)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("hash exe: %w", err)
		}
		if n == 0 {
			break
		}
		d.Write(buf[:n])
		off += int64(n)
	}
	if check {
		after, _, err := fdKey(fd)
		if err != nil {
			return "", fmt.Errorf("hash exe: %w", err)
		}
		if after != key {
			return "", fmt.Errorf("hash exe: %w", errExeChanged)
		}
	}
	return hex.EncodeToString(d.Sum(nil)), nil
}

func (h *exeHashes) get(key exeKey) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sums.Get(key)
}

func (h *exeHashes) put(key exeKey, sum string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sums.Add(key, sum)
}

// len reports how many sums the cache holds, for tests.
func (h *exeHashes) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sums.Len()
}

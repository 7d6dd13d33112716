package filewatch

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/fsnotify/fsnotify"
)

// watch runs a Watcher on path until the test ends and returns the
// contents it reports.
func watch(t *testing.T, path string, loaded []byte) <-chan string {
	t.Helper()
	got := make(chan string, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	w := &Watcher{Path: path, Loaded: loaded, Debounce: 20 * time.Millisecond}
	go func() { done <- w.Run(ctx, func(b []byte) { got <- string(b) }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return got
}

func expect(t *testing.T, got <-chan string, want string) {
	t.Helper()
	select {
	case g := <-got:
		if g != want {
			t.Errorf("onChange(%q), want %q", g, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no onChange(%q) within 5s", want)
	}
}

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestWatchEdits(t *testing.T) {
	tests := []struct {
		name string
		edit func(t *testing.T, path string)
	}{
		{"write in place", func(t *testing.T, path string) { write(t, path, "v2") }},
		{"rename over", func(t *testing.T, path string) {
			tmp := filepath.Join(filepath.Dir(path), ".policy.hcl.swp")
			write(t, tmp, "v2")
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		}},
		{"remove then create", func(t *testing.T, path string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			write(t, path, "v2")
		}},
		{"truncate, then write", func(t *testing.T, path string) {
			// The empty file in between is never reported.
			write(t, path, "")
			write(t, path, "v2")
		}},
		{"chmod, then write", func(t *testing.T, path string) {
			// The chmod alone changes no content: the first call must
			// carry the write.
			if err := os.Chmod(path, 0o600); err != nil {
				t.Fatal(err)
			}
			write(t, path, "v2")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "policy.hcl")
			write(t, path, "v1")
			got := watch(t, path, []byte("v1"))
			tt.edit(t, path)
			expect(t, got, "v2")
			// Keeps watching after the first change.
			write(t, path, "v3")
			expect(t, got, "v3")
		})
	}
}

func TestWatchSymlinkSwap(t *testing.T) {
	// The layout of a Kubernetes ConfigMap volume: the file is a link
	// through ..data, and an update swaps ..data by rename.
	dir := t.TempDir()
	for _, v := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(dir, v), 0o755); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(dir, v, "policy.hcl"), v)
	}
	if err := os.Symlink("v1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "policy.hcl")
	if err := os.Symlink("..data/policy.hcl", path); err != nil {
		t.Fatal(err)
	}
	got := watch(t, path, []byte("v1"))
	if err := os.Symlink("v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	expect(t, got, "v2")
}

func TestWatchChangeBeforeStart(t *testing.T) {
	// The caller loaded v1, the file changed before the watch began.
	path := filepath.Join(t.TempDir(), "bundle.pem")
	write(t, path, "v2")
	expect(t, watch(t, path, []byte("v1")), "v2")
}

func TestWatchMissingDirectory(t *testing.T) {
	w := &Watcher{Path: filepath.Join(t.TempDir(), "no", "such", "file")}
	if err := w.Run(context.Background(), func([]byte) {}); err == nil {
		t.Error("Run on a missing directory succeeded")
	}
}

// TestDebounce drives the loop with made-up events on a fake clock.
func TestDebounce(t *testing.T) {
	tests := []struct {
		name      string
		events    int
		gap       time.Duration
		wantCalls int
	}{
		{"burst is one read", 5, 10 * time.Millisecond, 1},
		{"quiet gaps are separate reads", 3, 200 * time.Millisecond, 3},
		{"endless stream still reads", 40, 50 * time.Millisecond, 2},
		{"other names are ignored", 0, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "policy.hcl")
			write(t, path, "v0")
			synctest.Test(t, func(t *testing.T) {
				events := make(chan fsnotify.Event)
				var mu sync.Mutex
				calls := 0
				w := &Watcher{Path: path, Loaded: []byte("v0"), Debounce: 100 * time.Millisecond}
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan error)
				go func() {
					done <- w.loop(ctx, events, nil, func([]byte) { mu.Lock(); calls++; mu.Unlock() })
				}()
				events <- fsnotify.Event{Name: filepath.Join(filepath.Dir(path), "other.hcl"), Op: fsnotify.Write}
				for i := range tt.events {
					// By rename: the loop may read while this writes.
					write(t, path+".tmp", fmt.Sprint("v", i+1))
					if err := os.Rename(path+".tmp", path); err != nil {
						t.Fatal(err)
					}
					events <- fsnotify.Event{Name: path, Op: fsnotify.Write}
					time.Sleep(tt.gap) // fake time
				}
				time.Sleep(time.Second)
				synctest.Wait()
				cancel()
				if err := <-done; err != nil {
					t.Errorf("loop: %v", err)
				}
				if calls != tt.wantCalls {
					t.Errorf("onChange called %d times, want %d", calls, tt.wantCalls)
				}
			})
		})
	}
}

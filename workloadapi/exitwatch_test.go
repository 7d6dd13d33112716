package workloadapi

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/lanyard-dev/lanyard/attestor/workload"
	"github.com/lanyard-dev/lanyard/internal/testwait"
)

// startExitWatcher returns a watcher that stops with the test.
func startExitWatcher(t *testing.T) *exitWatcher {
	t.Helper()
	x, err := newExitWatcher(hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(x.stop)
	return x
}

// startSleeper starts a process that lives until the test kills it or
// ends.
func startSleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(sleepBinary(t), "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

// openPIDFD opens a pidfd on pid as the agent holds one (workload.NewPIDFD).
func openPIDFD(t *testing.T, pid int) *os.File {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	f, err := workload.NewPIDFD(fd)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// rawFD returns f's descriptor without making it blocking (as Fd would).
func rawFD(t *testing.T, f *os.File) int {
	t.Helper()
	raw, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := raw.Control(func(u uintptr) { fd = int(u) }); err != nil {
		t.Fatal(err)
	}
	return fd
}

// kill ends cmd and reaps it.
func kill(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
}

// closedWithin reports whether ch is closed within d.
func closedWithin(ch <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// epollEntries returns the user data of every entry of x's epoll set, as
// the kernel lists them in /proc/self/fdinfo.
func epollEntries(t *testing.T, x *exitWatcher) []uint64 {
	t.Helper()
	x.mu.Lock()
	defer x.mu.Unlock()
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(x.epfd))
	if err != nil {
		t.Fatal(err)
	}
	var data []uint64
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 6 || f[0] != "tfd:" || f[4] != "data:" {
			continue
		}
		d, err := strconv.ParseUint(f[5], 16, 64)
		if err != nil {
			t.Fatalf("fdinfo line %q: %v", line, err)
		}
		data = append(data, d)
	}
	return data
}

// TestExitWatcherExitEndsOnlyItsWatch: when one caller exits, only its
// channel closes and only its entry leaves the epoll set; the other
// callers' stay watched, under their registration ids.
func TestExitWatcherExitEndsOnlyItsWatch(t *testing.T) {
	x := startExitWatcher(t)
	a, b := startSleeper(t), startSleeper(t)
	wa, wb := newExitWatch(x, openPIDFD(t, a.Process.Pid)), newExitWatch(x, openPIDFD(t, b.Process.Pid))
	defer wa.close()
	defer wb.close()
	doneA, doneB := wa.exited(), wb.exited()
	if doneA == nil || doneB == nil {
		t.Fatal("exited gave nil for a live process")
	}
	if wa.exited() != doneA {
		t.Error("a second exited gave another channel")
	}
	if got, want := slices.Sorted(slices.Values(epollEntries(t, x))), []uint64{wa.id, wb.id}; !slices.Equal(got, want) {
		t.Errorf("epoll entries hold data %v, want the registration ids %v", got, want)
	}

	kill(t, a)
	if !closedWithin(doneA, 10*time.Second) {
		t.Fatal("the exit of a did not close its channel within 10s")
	}
	if isClosed(doneB) {
		t.Error("the exit of a closed b's channel")
	}
	wantWatching(t, x, 1, "after a's exit")
	if got := epollEntries(t, x); len(got) != 1 || got[0] != wb.id {
		t.Errorf("epoll entries hold data %v after a's exit, want [%d]", got, wb.id)
	}

	kill(t, b)
	if !closedWithin(doneB, 10*time.Second) {
		t.Fatal("the exit of b did not close its channel within 10s")
	}
	wantWatching(t, x, 0, "after both exits")
}

// TestExitWatchClose: closing a watch (its connection ended) closes its
// channel and takes its pidfd out of the epoll set before closing it. The
// entry would outlive the close without EPOLL_CTL_DEL here, as another
// descriptor (a dup) holds the same open file.
func TestExitWatchClose(t *testing.T) {
	x := startExitWatcher(t)
	p := startSleeper(t)
	tests := []struct {
		name  string
		asked bool // a stream asked for the channel before the close
	}{
		{"watched", true},
		{"never asked", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pidfd := openPIDFD(t, p.Process.Pid)
			fd := rawFD(t, pidfd)
			dup, err := unix.Dup(fd)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(dup)
			w := newExitWatch(x, pidfd)
			var done <-chan struct{}
			if tc.asked {
				done = w.exited()
				if n := len(epollEntries(t, x)); n != 1 {
					t.Fatalf("%d epoll entries while watched, want 1", n)
				}
			}
			if err := w.close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			if tc.asked && !isClosed(done) {
				t.Error("close left the channel open")
			}
			if !isClosed(w.exited()) {
				t.Error("exited after close gave a channel that is not closed")
			}
			wantWatching(t, x, 0, "after close")
			if got := epollEntries(t, x); len(got) != 0 {
				t.Errorf("epoll entries %v after close, want none", got)
			}
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
				t.Errorf("F_GETFD on the pidfd after close: %v, want EBADF", err)
			}
			if err := w.close(); err != nil {
				t.Errorf("second close: %v", err)
			}
		})
	}
}

// TestExitWatcherStop: stopping the watcher closes every channel still
// registered, ends its goroutine, and a watch asked for afterwards ends at
// once (nobody would watch it).
func TestExitWatcherStop(t *testing.T) {
	x, err := newExitWatcher(hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	p := startSleeper(t)
	w := newExitWatch(x, openPIDFD(t, p.Process.Pid))
	defer w.close()
	done := w.exited()
	x.stop()
	if !isClosed(x.ended) {
		t.Error("stop returned before the watcher's goroutine ended")
	}
	if !isClosed(done) {
		t.Error("stop left a registered channel open")
	}
	late := newExitWatch(x, openPIDFD(t, p.Process.Pid))
	defer late.close()
	if !isClosed(late.exited()) {
		t.Error("a watch asked for after stop gave a channel that is not closed")
	}
	wantWatching(t, x, 0, "after stop")
}

// TestExitWatcherConcurrent registers and closes watches from many
// goroutines at once, some on a process that lives and some on one that
// has exited (its watch ends as soon as it is registered, racing the
// close), and asks for the same channel from several streams at once.
func TestExitWatcherConcurrent(t *testing.T) {
	x := startExitWatcher(t)
	live := startSleeper(t)
	gone := startSleeper(t)
	goneFile := openPIDFD(t, gone.Process.Pid)
	defer goneFile.Close()
	goneFD := rawFD(t, goneFile)
	kill(t, gone)

	const workers, rounds = 8, 50
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			for r := range rounds {
				var pidfd *os.File
				if (i+r)%2 == 0 {
					fd, err := unix.PidfdOpen(live.Process.Pid, unix.PIDFD_NONBLOCK)
					if err != nil {
						t.Error(err)
						return
					}
					pidfd, _ = workload.NewPIDFD(fd)
				} else {
					fd, err := unix.Dup(goneFD)
					if err != nil {
						t.Error(err)
						return
					}
					pidfd, _ = workload.NewPIDFD(fd)
				}
				w := newExitWatch(x, pidfd)
				var streams sync.WaitGroup
				chans := make([]<-chan struct{}, 3)
				for s := range chans {
					streams.Go(func() { chans[s] = w.exited() })
				}
				streams.Wait()
				if chans[0] != chans[1] || chans[1] != chans[2] {
					t.Error("streams of one connection got different channels")
				}
				_ = w.close()
				if !isClosed(chans[0]) {
					t.Error("close left the channel open")
				}
			}
		})
	}
	wg.Wait()
	wantWatching(t, x, 0, "after every close")
	if got := epollEntries(t, x); len(got) != 0 {
		t.Errorf("epoll entries %v after every close, want none", got)
	}
}

// TestServerExitWatches: a connection's stream registers its caller once,
// closing the connection removes it, and Run stops the watcher.
func TestServerExitWatches(t *testing.T) {
	const n = 20
	srv := startStreamServer(t)
	h := startStreams(t, srv.path, n)
	x := srv.server.exits
	if got := x.watching(); got != n {
		t.Errorf("watching %d with %d streams open, want %d", got, n, n)
	}
	h.stop()
	testwait.For(t, 10*time.Second, "the closed connections' watches to end", func() bool { return x.watching() == 0 })
	if err := srv.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !isClosed(x.ended) {
		t.Error("Run returned before the exit watcher's goroutine ended")
	}
}

// wantWatching checks how many registrations x holds at a point of a test.
func wantWatching(t *testing.T, x *exitWatcher, want int, when string) {
	t.Helper()
	if n := x.watching(); n != want {
		t.Errorf("watching %d %s, want %d", n, when, want)
	}
}

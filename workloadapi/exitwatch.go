package workloadapi

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// errExitWatcherStopped refuses a watch asked for once the Server stopped
// watching exits (it is shutting down, or its epoll instance failed).
var errExitWatcherStopped = errors.New("exit watcher stopped")

// exitEventBatch is how many exits one wake-up of the watcher handles;
// more are handled by the next, at once.
const exitEventBatch = 64

// maxEINTR bounds the retries of an interrupted epoll_wait(0).
const maxEINTR = 100

// exitWatcher tells streams that the process that opened their connection
// has exited, for every connection of a Server. Each watched pidfd sits in
// one epoll instance, and one goroutine waits on that instance through
// Go's poller (an epoll fd is readable while any fd in it has an event),
// so N idle streams cost N epoll entries and no goroutine, thread or
// wake-up of their own.
//
// An entry is keyed by a registration id, never by the fd number: a
// number is reused as soon as its fd is closed. And an entry is removed
// (EPOLL_CTL_DEL) before its fd is closed, under mu, which exitWatch.close
// and the watcher's own removal both take, so no entry ever outlives its
// fd (exitWatch owns the close).
type exitWatcher struct {
	log   hclog.Logger
	ep    *os.File // the epoll instance, waited on in Go's poller
	ended chan struct{}

	mu      sync.Mutex
	epfd    int // ep's descriptor; open while !stopped
	regs    map[uint64]exitReg
	lastID  uint64
	stopped bool

	events []unix.EpollEvent // only run's goroutine uses it
}

// exitReg is one watched pidfd and the channel its exit closes.
type exitReg struct {
	fd   int
	done chan struct{}
}

// newExitWatcher creates the epoll instance and starts the goroutine that
// waits on it; stop ends it.
func newExitWatcher(log hclog.Logger) (*exitWatcher, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	// Non-blocking, so that os.NewFile hands it to Go's poller: the
	// goroutine then parks there instead of holding a thread.
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("epoll: set non-blocking: %w", err)
	}
	x := &exitWatcher{
		log:    log,
		ep:     os.NewFile(uintptr(fd), "epoll"),
		ended:  make(chan struct{}),
		epfd:   fd,
		regs:   map[uint64]exitReg{},
		events: make([]unix.EpollEvent, exitEventBatch),
	}
	go x.run()
	return x, nil
}

// run handles exits until stop, or until the epoll instance fails; then
// it closes every channel still registered (a stream ends rather than
// outlive a process nobody watches) and refuses new watches.
func (x *exitWatcher) run() {
	defer close(x.ended)
	raw, err := x.ep.SyscallConn()
	for err == nil {
		var waitErr error
		err = raw.Read(func(fd uintptr) bool {
			var handled bool
			handled, waitErr = x.handle(int(fd))
			return handled
		})
		err = cmp.Or(err, waitErr)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		x.log.Error("stopped watching callers' exits", "error", err)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.stopped = true
	for id, r := range x.regs {
		delete(x.regs, id)
		close(r.done)
	}
	_ = x.ep.Close() // its entries go with it; their pidfds stay open
}

// handle takes the events ready on the epoll instance, without waiting,
// and ends the watch of each process that exited. It returns false when
// none was ready (the caller waits for readiness), and an error when the
// epoll instance cannot be read.
func (x *exitWatcher) handle(epfd int) (bool, error) {
	for range maxEINTR {
		n, err := unix.EpollWait(epfd, x.events, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return true, fmt.Errorf("epoll_wait: %w", err)
		}
		if n == 0 {
			return false, nil
		}
		x.mu.Lock()
		for _, ev := range x.events[:n] {
			// Any event (readable, or an error or hang-up) means the
			// process is gone or can no longer be watched.
			x.removeLocked(eventID(ev))
		}
		x.mu.Unlock()
		return true, nil
	}
	return true, fmt.Errorf("epoll_wait: %w", unix.EINTR)
}

// add watches pidfd and closes done once its process exits; it returns the
// registration's id for remove. On error done is left open.
func (x *exitWatcher) add(pidfd *os.File, done chan struct{}) (uint64, error) {
	raw, err := pidfd.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("watch pidfd: %w", err)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.stopped {
		return 0, errExitWatcherStopped
	}
	x.lastID++
	id := x.lastID
	var ctlErr error
	// Control holds the pidfd open while it is added, and under mu it
	// stays open until remove: exitWatch.close removes, then closes.
	err = raw.Control(func(fd uintptr) {
		// One-shot: a process exits once, and an entry that somehow
		// stayed would never report again.
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLONESHOT}
		setEventID(&ev, id)
		if ctlErr = unix.EpollCtl(x.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev); ctlErr == nil {
			x.regs[id] = exitReg{fd: int(fd), done: done}
		}
	})
	if err = cmp.Or(err, ctlErr); err != nil {
		return 0, fmt.Errorf("watch pidfd: epoll_ctl: %w", err)
	}
	return id, nil
}

// remove ends the watch id, if it is still on, and closes its channel.
// Its pidfd may be closed once remove returns.
func (x *exitWatcher) remove(id uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.removeLocked(id)
}

func (x *exitWatcher) removeLocked(id uint64) {
	r, ok := x.regs[id]
	if !ok {
		return // already ended: exited, removed, or the watcher stopped
	}
	delete(x.regs, id)
	// Cannot fail while the fd is open and in the set, which mu ensures.
	_ = unix.EpollCtl(x.epfd, unix.EPOLL_CTL_DEL, r.fd, nil)
	close(r.done)
}

// watching returns how many pidfds are watched.
func (x *exitWatcher) watching() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.regs)
}

// stop ends run, which closes every channel still registered, and returns
// once it has. Run calls it after the gRPC server has stopped, so that no
// stream is told its caller exited because the agent is stopping.
func (x *exitWatcher) stop() {
	// A deadline in the past wakes run's wait, and fails every later one.
	_ = x.ep.SetReadDeadline(time.Unix(1, 0))
	<-x.ended
}

// eventID and setEventID keep a registration id in an event's 64-bit
// user data (Fd and Pad in x/sys/unix's layout).
func eventID(ev unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

func setEventID(ev *unix.EpollEvent, id uint64) {
	ev.Fd, ev.Pad = int32(uint32(id)), int32(uint32(id>>32))
}

// exitWatch tells the streams of one connection that the process that
// connected has exited. It owns the caller's pidfd: the first stream that
// asks registers it with the Server's exitWatcher, and close takes it out
// of the watcher before closing it.
type exitWatch struct {
	watcher *exitWatcher
	pidfd   *os.File

	mu     sync.Mutex
	done   chan struct{} // made by the first exited
	id     uint64        // the registration; 0 when none was made
	closed bool
}

func newExitWatch(watcher *exitWatcher, pidfd *os.File) *exitWatch {
	return &exitWatch{watcher: watcher, pidfd: pidfd}
}

// exited returns a channel closed once the process exits or its pidfd is
// closed (the connection ended), or at once when the exit cannot be
// watched: a stream then ends rather than outlive a process nobody
// watches. Nil (never closed) when there is nothing to watch: a caller
// that was gone at accept never gets a stream.
func (w *exitWatch) exited() <-chan struct{} {
	if w == nil || w.pidfd == nil {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done != nil {
		return w.done
	}
	w.done = make(chan struct{})
	if w.closed || w.watcher == nil {
		close(w.done)
		return w.done
	}
	id, err := w.watcher.add(w.pidfd, w.done)
	if err != nil {
		close(w.done)
		return w.done
	}
	w.id = id
	return w.done
}

// close ends the watch, closing the channel exited gave, and then closes
// the pidfd: in this order, so that the watcher never holds an fd number
// that may already name another file.
func (w *exitWatch) close() error {
	if w == nil || w.pidfd == nil {
		return nil
	}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	if w.id != 0 {
		w.watcher.remove(w.id)
	}
	w.mu.Unlock()
	return w.pidfd.Close()
}

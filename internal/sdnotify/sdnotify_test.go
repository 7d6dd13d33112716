package sdnotify

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// listen opens a notify socket like systemd's and returns what arrives on
// it, one datagram per string.
func listen(t *testing.T) (string, <-chan string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	out := make(chan string, 256)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(out)
				return
			}
			out <- string(buf[:n])
		}
	}()
	return path, out
}

// next returns the next datagram that satisfies match, failing after d.
// Datagrams that do not match are passed to skip.
func next(t *testing.T, c <-chan string, d time.Duration, match func(string) bool, skip func(string)) string {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m, ok := <-c:
			if !ok {
				t.Fatal("notify socket closed")
			}
			if match(m) {
				return m
			}
			if skip != nil {
				skip(m)
			}
		case <-deadline:
			t.Fatalf("no matching notification within %v", d)
		}
	}
}

func has(line string) func(string) bool {
	return func(m string) bool { return strings.Contains(m, line) }
}

func TestFromEnv(t *testing.T) {
	tests := []struct {
		name         string
		socket, usec string
		pid          string
		wantEnabled  bool
		wantWatchdog time.Duration
	}{
		{name: "outside systemd"},
		{name: "notify without watchdog", socket: "/run/x", wantEnabled: true},
		{name: "watchdog", socket: "/run/x", usec: "30000000", wantEnabled: true, wantWatchdog: 30 * time.Second},
		{name: "watchdog for another pid", socket: "/run/x", usec: "30000000", pid: "1", wantEnabled: true},
		{name: "malformed watchdog", socket: "/run/x", usec: "soon", wantEnabled: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("NOTIFY_SOCKET", tt.socket)
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			n := FromEnv(nil)
			if n.Enabled() != tt.wantEnabled || n.WatchdogInterval() != tt.wantWatchdog {
				t.Errorf("FromEnv: enabled %v watchdog %v, want %v %v", n.Enabled(), n.WatchdogInterval(), tt.wantEnabled, tt.wantWatchdog)
			}
		})
	}
}

func TestRunProtocol(t *testing.T) {
	path, msgs := listen(t)
	t.Setenv("NOTIFY_SOCKET", path)
	t.Setenv("WATCHDOG_USEC", "100000") // pings every 50ms
	t.Setenv("WATCHDOG_PID", "")
	n := FromEnv(nil)

	var status atomic.Value
	status.Store("starting")
	var calls atomic.Int64
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- n.Run(ctx, Daemon{Ready: ready, Status: func() string {
			calls.Add(1)
			return status.Load().(string)
		}})
	}()

	if m := next(t, msgs, 5*time.Second, has("STATUS="), nil); m != "STATUS=starting" {
		t.Errorf("first notification = %q, want STATUS=starting", m)
	}
	// Pings before READY: the daemon is alive while it starts.
	notReady := func(m string) {
		if strings.Contains(m, "READY=1") {
			t.Errorf("READY=1 before the daemon was ready: %q", m)
		}
	}
	for range 2 {
		next(t, msgs, 5*time.Second, has("WATCHDOG=1"), notReady)
	}
	if calls.Load() < 3 {
		t.Errorf("Status called %d times, want it called before every ping", calls.Load())
	}
	status.Store("serving 2 entries")
	close(ready)
	m := next(t, msgs, 5*time.Second, has("READY=1"), nil)
	if m != "READY=1\nSTATUS=serving 2 entries" {
		t.Errorf("ready notification = %q", m)
	}
	status.Store("degraded: signer unreachable")
	next(t, msgs, 5*time.Second, has("STATUS=degraded: signer unreachable"), nil)
	next(t, msgs, 5*time.Second, has("WATCHDOG=1"), nil)

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	next(t, msgs, 5*time.Second, has("STOPPING=1"), nil)
}

func TestRunWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := FromEnv(nil)
	// Returns at once: nothing listens, so there is nothing to do.
	if err := n.Run(context.Background(), Daemon{Ready: make(chan struct{}), Status: func() string { return "x" }}); err != nil {
		t.Errorf("Run: %v", err)
	}
	if err := n.Send("READY=1"); err != nil {
		t.Errorf("Send: %v", err)
	}
}

func TestSendToMissingSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "gone"))
	if err := FromEnv(nil).Send("READY=1"); err == nil {
		t.Error("Send to a missing socket succeeded")
	}
}

// Package leakcheck fails a test binary whose goroutines outlive the
// tests that started them: every long-lived part must stop when its Run
// returns (STYLE "One Run(ctx) error per long-lived part"), and a
// goroutine nobody owns is how that breaks unseen. It reads only
// runtime.Stack, so it needs no dependency.
package leakcheck

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// module is the frame prefix of the goroutines that are ours to account
// for: those of gRPC, fsnotify or the runtime stop on their own schedule.
const module = "github.com/lanyard-dev/lanyard/"

// wait is how long goroutines get to finish after the tests: a part's
// goroutines end when its Run returns, but a connection closed by a
// cleanup may take a moment to unwind.
const wait = 5 * time.Second

// Main runs the tests and then fails the binary if goroutines running
// this module's code are still alive after wait. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := poll(wait); leaked != "" {
			fmt.Fprintf(os.Stderr, "leakcheck: goroutines outlived the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// poll returns the stacks of this module's goroutines still alive after
// waiting up to d for them to end, or "" once there are none.
func poll(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		leaked := ours()
		if leaked == "" || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ours returns the stacks of the goroutines, other than the caller's,
// that run this module's code.
func ours() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	// The first goroutine is the caller's own.
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i == 0 || !strings.Contains(g, module) {
			continue
		}
		out = append(out, g)
	}
	return strings.Join(out, "\n\n")
}

// Package testwait is for tests: it waits for a condition by polling it
// until a deadline, so that no test sleeps for correctness. A
// test that can run in a synctest bubble should do that instead.
package testwait

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"
)

// interval is how often For looks again: short next to what tests wait
// for, long next to the cost of the conditions they pass.
const interval = 5 * time.Millisecond

// For polls cond until it holds, and fails the test (naming what it waited
// for) when d passes first.
func For(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(interval)
	}
}

// Exe waits until process pid runs the executable at path (its
// /proc/<pid>/exe leads there): a child that was told to exec has done so.
func Exe(t testing.TB, pid int, path string) {
	t.Helper()
	For(t, 10*time.Second, fmt.Sprintf("pid %d to run %s", pid, path), func() bool {
		exe, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
		return exe == path
	})
}

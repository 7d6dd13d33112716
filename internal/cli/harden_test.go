package cli

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestHarden runs Harden in a child process (it cannot be undone) and
// checks what the kernel then reports for it.
func TestHarden(t *testing.T) {
	if os.Getenv("LANYARD_HARDEN_CHILD") == "1" {
		if err := Harden(); err != nil {
			t.Fatal(err)
		}
		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_CORE, &lim); err != nil {
			t.Fatal(err)
		}
		dumpable, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		limits, err := os.ReadFile("/proc/self/limits")
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("RESULT %d %d %d %t\n", lim.Cur, lim.Max, dumpable,
			regexp.MustCompile(`Max core file size +0 +0 `).Match(limits))
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHarden$", "-test.count=1")
	cmd.Env = append(os.Environ(), "LANYARD_HARDEN_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	_, res, ok := strings.Cut(string(out), "RESULT ")
	if !ok {
		t.Fatalf("child printed no result:\n%s", out)
	}
	res, _, _ = strings.Cut(res, "\n")
	if want := "0 0 0 true"; res != want {
		t.Errorf("core soft, core hard, dumpable, /proc limits line = %q, want %q", res, want)
	}
}

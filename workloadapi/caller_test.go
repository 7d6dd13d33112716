package workloadapi

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	wlclient "github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/status"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
)

// The test binary doubles as the workload under test: run with
// LANYARD_TEST_HELPER set, it plays a caller instead of running tests.
const (
	helperEnv    = "LANYARD_TEST_HELPER"
	helperSocket = "LANYARD_TEST_SOCKET"
	// helperMarker is a string the binary holds; changing one byte of
	// it gives a copy that runs the same and hashes differently.
	helperMarker = "lanyard-helper-marker-5d0c1a7e"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(runHelper(mode, os.Getenv(helperSocket)))
	}
	os.Exit(m.Run())
}

// runHelper plays a caller:
//   - fetch: fetch X.509-SVIDs and print their IDs, or "error <code>";
//   - connect: connect fd 3 to the socket and exit at once;
//   - connect-setuid: connect fd 3, become uid 65534, say "ready", and
//     wait for stdin to close.
func runHelper(mode, socket string) int {
	fmt.Fprintln(os.Stderr, helperMarker)
	if code, ok := runPinnedHelper(mode, socket); ok {
		return code
	}
	if mode == "streams" {
		return runStreamsHelper(socket)
	}
	switch mode {
	case "fetch":
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := wlclient.New(ctx, wlclient.WithAddr("unix://"+socket))
		if err != nil {
			fmt.Println("error", err)
			return 3
		}
		defer c.Close()
		x, err := c.FetchX509Context(ctx)
		if err != nil {
			fmt.Println("error", status.Code(err))
			return 0
		}
		for _, s := range x.SVIDs {
			fmt.Println(s.ID.String())
		}
		return 0
	case "connect", "connect-setuid":
		if err := unix.Connect(3, &unix.SockaddrUnix{Name: socket}); err != nil {
			fmt.Fprintln(os.Stderr, "connect:", err)
			return 3
		}
		if mode == "connect" {
			return 0
		}
		if err := syscall.Setuid(65534); err != nil {
			fmt.Fprintln(os.Stderr, "setuid:", err)
			return 3
		}
		fmt.Println("ready")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
	return 3
}

// entrySource serves each entry whose selectors are all among the
// caller's, in entry order, as the agent's cache does.
type entrySource struct {
	entries []testEntry
	bundles *workload.X509BundlesResponse

	mu        sync.Mutex
	responses map[string]*workload.X509SVIDResponse
}

type testEntry struct {
	selectors []string
	svid      *workload.X509SVID
}

func newEntrySource(t *testing.T, ca *testCA, entries map[string][]string, order []string) *entrySource {
	t.Helper()
	s := &entrySource{bundles: ca.bundlesResponse(), responses: map[string]*workload.X509SVIDResponse{}}
	for _, path := range order {
		s.entries = append(s.entries, testEntry{selectors: entries[path], svid: ca.svidResponse(t, path).Svids[0]})
	}
	return s
}

func (s *entrySource) X509SVIDResponse(selectors []string) (*workload.X509SVIDResponse, <-chan struct{}) {
	var key strings.Builder
	r := &workload.X509SVIDResponse{}
	for i, e := range s.entries {
		if !slices.ContainsFunc(e.selectors, func(sel string) bool { return !slices.Contains(selectors, sel) }) {
			r.Svids = append(r.Svids, e.svid)
			key.WriteString(strconv.Itoa(i) + ",")
		}
	}
	if len(r.Svids) == 0 {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if prev, ok := s.responses[key.String()]; ok {
		return prev, nil
	}
	s.responses[key.String()] = r
	return r, nil
}

func (s *entrySource) X509BundlesResponse() (*workload.X509BundlesResponse, <-chan struct{}) {
	return s.bundles, nil
}

func (s *entrySource) X509BundlesFor([]string) (*workload.X509BundlesResponse, <-chan struct{}) {
	return s.bundles, nil
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("running callers under other uids needs root")
	}
}

func newWorkloadAttestor(t *testing.T) *attestor.Workload {
	t.Helper()
	w, err := attestor.New(attestor.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// helperCopies writes the test binary to a directory every user can enter,
// and a copy with one byte of helperMarker changed to another directory.
func helperCopies(t *testing.T) (exe, changed string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, []byte(helperMarker))
	if i < 0 {
		t.Fatal("the test binary does not hold helperMarker")
	}
	write := func(content []byte) string {
		dir := socketDir(t)
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, "caller")
		if err := os.WriteFile(p, content, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	exe = write(b)
	b = bytes.Clone(b)
	b[i+len(helperMarker)-1] ^= 0x01
	return exe, write(b)
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// startOpenServer runs a server whose socket directory every user can
// enter.
func startOpenServer(t *testing.T, att Attestor, src Source) *running {
	t.Helper()
	dir := socketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return startServerAt(t, filepath.Join(dir, "w.sock"), att, src)
}

func helperCmd(exe, mode, socket string) *exec.Cmd {
	cmd := exec.Command(exe)
	// Without atexit_sleep_ms=0 a race-enabled helper sleeps 1s on exit.
	cmd.Env = []string{helperEnv + "=" + mode, helperSocket + "=" + socket, "GORACE=atexit_sleep_ms=0"}
	return cmd
}

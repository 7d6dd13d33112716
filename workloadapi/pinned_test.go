package workloadapi

import (
	"bufio"
	"context"
	"fmt"
	"io"
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

	"github.com/lanyard-dev/lanyard/internal/testwait"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// helperSleep names the sleep binary an owner helper execs.
const helperSleep = "LANYARD_TEST_SLEEP"

// runPinnedHelper plays the processes of the pinned-caller tests; ok is
// false for a mode it does not know.
//   - owner: connect fd 3 to the socket, then obey stdin (ownerCommands);
//   - owner-pass: connect a socket of its own, pass it over the socketpair
//     on fd 3 (SCM_RIGHTS), close its copy, then obey stdin;
//   - reader: on a line on stdin, stream FetchX509SVID over the connection
//     on fd 3 and print each response's SPIFFE IDs, then how it ended;
//   - reader-recv: the same over a connection received on fd 3;
//   - reader-sds, reader-sds-recv: the same over Envoy's SDS
//     (readSDSStream).
func runPinnedHelper(mode, socket string) (code int, ok bool) {
	switch mode {
	case "owner", "owner-pass":
		fd := 3
		if mode == "owner-pass" {
			s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fail("socket", err), true
			}
			fd = s
		}
		if err := unix.Connect(fd, &unix.SockaddrUnix{Name: socket}); err != nil {
			return fail("connect", err), true
		}
		// Wait, without consuming it, for the server's first frame: it is
		// sent only once the agent has accepted and pinned the connection.
		// An exec before that would fall in the window README's "The
		// window at connect" describes, which these tests are not about.
		if _, _, err := unix.Recvfrom(fd, make([]byte, 1), unix.MSG_PEEK); err != nil {
			return fail("wait for the server", err), true
		}
		if mode == "owner-pass" {
			if err := unix.Sendmsg(3, []byte{0}, unix.UnixRights(fd), nil, 0); err != nil {
				return fail("sendmsg", err), true
			}
			_ = unix.Close(fd)
		} else if _, err := unix.FcntlInt(3, unix.F_SETFD, 0); err != nil {
			// The connection stays open across exec, as a fork's would.
			return fail("clear FD_CLOEXEC", err), true
		}
		fmt.Println("ready")
		return ownerCommands(), true
	case "reader", "reader-recv", "reader-sds", "reader-sds-recv":
		fd := 3
		if strings.HasSuffix(mode, "-recv") {
			var err error
			if fd, err = receiveFD(3); err != nil {
				return fail("receive", err), true
			}
		}
		fmt.Println("ready")
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			return fail("stdin", err), true
		}
		if strings.HasPrefix(mode, "reader-sds") {
			cc, err := clientOver(os.NewFile(uintptr(fd), "conn"))
			if err != nil {
				fmt.Println("end", err)
				return 0, true
			}
			defer cc.Close()
			readSDSStream(cc)
			return 0, true
		}
		readStream(os.NewFile(uintptr(fd), "conn"))
		return 0, true
	}
	return 0, false
}

func fail(step string, err error) int {
	fmt.Fprintln(os.Stderr, step+":", err)
	return 3
}

// ownerCommands obeys stdin: "exec" becomes sleep (the connection stays
// open), "setuid" becomes uid 65534 and says "done"; end of input exits.
func ownerCommands() int {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "exec":
			sleep := os.Getenv(helperSleep)
			return fail("exec", syscall.Exec(sleep, []string{sleep, "60"}, nil))
		case "setuid":
			if err := syscall.Setuid(65534); err != nil {
				return fail("setuid", err)
			}
			fmt.Println("done")
		}
	}
	return 0
}

// receiveFD receives one descriptor sent over the socket fd.
func receiveFD(fd int) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(fd, make([]byte, 1), oob, 0)
	if err != nil {
		return -1, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("control messages: %d, %v", len(msgs), err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return -1, fmt.Errorf("rights: %v, %v", fds, err)
	}
	return fds[0], nil
}

// readStream prints "svid <ids>" per response of a FetchX509SVID stream on
// the connection in f, then "end <code>: <message>".
func readStream(f *os.File) {
	cc, err := clientOver(f)
	if err != nil {
		fmt.Println("end", err)
		return
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, securityHeader, "true")
	stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	for err == nil {
		var resp *workload.X509SVIDResponse
		if resp, err = stream.Recv(); err == nil {
			var ids []string
			for _, s := range resp.GetSvids() {
				ids = append(ids, strings.TrimPrefix(s.GetSpiffeId(), "spiffe://example.org"))
			}
			fmt.Println("svid", strings.Join(ids, ","))
		}
	}
	st := status.Convert(err)
	fmt.Printf("end %s: %s\n", st.Code(), st.Message())
}

// rotatingSource serves each entry whose selectors are all the caller's,
// and mints all of them afresh on rotate, waking every stream.
type rotatingSource struct {
	ca      *testCA
	t       *testing.T
	entries map[string][]string // path -> selectors
	order   []string

	mu      sync.Mutex
	svids   map[string]*workload.X509SVID
	resps   map[string]*workload.X509SVIDResponse // by matched paths
	changed chan struct{}
}

func newRotatingSource(t *testing.T, entries map[string][]string, order []string) *rotatingSource {
	s := &rotatingSource{ca: newTestCA(t), t: t, entries: entries, order: order}
	s.mint()
	return s
}

func (s *rotatingSource) mint() {
	s.svids = map[string]*workload.X509SVID{}
	for _, p := range s.order {
		s.svids[p] = s.ca.svidResponse(s.t, p).Svids[0]
	}
	s.resps = map[string]*workload.X509SVIDResponse{}
	s.changed = make(chan struct{})
}

// rotate replaces every SVID, as a renewal would.
func (s *rotatingSource) rotate() {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.changed
	s.mint()
	close(old)
}

func (s *rotatingSource) X509SVIDResponse(selectors []string) (*workload.X509SVIDResponse, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var matched []string
	for _, p := range s.order {
		if !slices.ContainsFunc(s.entries[p], func(sel string) bool { return !slices.Contains(selectors, sel) }) {
			matched = append(matched, p)
		}
	}
	if len(matched) == 0 {
		return nil, s.changed
	}
	key := strings.Join(matched, ",")
	if r, ok := s.resps[key]; ok {
		return r, s.changed
	}
	r := &workload.X509SVIDResponse{}
	for _, p := range matched {
		r.Svids = append(r.Svids, s.svids[p])
	}
	s.resps[key] = r
	return r, s.changed
}

func (s *rotatingSource) X509BundlesResponse() (*workload.X509BundlesResponse, <-chan struct{}) {
	return s.ca.bundlesResponse(), nil
}

func (s *rotatingSource) X509BundlesFor([]string) (*workload.X509BundlesResponse, <-chan struct{}) {
	return s.ca.bundlesResponse(), nil
}

// child is a helper process with its stdin and a line reader on stdout.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
}

// startPiped starts cmd with pipes to its stdin and from its stdout.
func startPiped(tb testing.TB, cmd *exec.Cmd, what string) (io.WriteCloser, io.ReadCloser) {
	tb.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", what, err)
	}
	return stdin, stdout
}

func startChild(t *testing.T, exe, mode, socket string, cred *syscall.Credential, fd *os.File) *child {
	t.Helper()
	cmd := helperCmd(exe, mode, socket)
	cmd.Env = append(cmd.Env, helperSleep+"="+sleepBinary(t))
	cmd.ExtraFiles = []*os.File{fd}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.Stderr = os.Stderr
	stdin, stdout := startPiped(t, cmd, mode)
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 16)}
	go func() {
		defer close(c.lines)
		in := bufio.NewScanner(stdout)
		for in.Scan() {
			c.lines <- in.Text()
		}
	}()
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return c
}

// next returns the child's next line, or fails the test after 15s.
func (c *child) next(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-c.lines:
		if !ok {
			t.Fatalf("%s ended its output", c.cmd.Env[0])
		}
		return l
	case <-time.After(15 * time.Second):
		t.Fatalf("%s said nothing for 15s", c.cmd.Env[0])
		return ""
	}
}

func (c *child) say(t *testing.T, line string) {
	t.Helper()
	if _, err := io.WriteString(c.stdin, line+"\n"); err != nil {
		t.Fatalf("tell %s %q: %v", c.cmd.Env[0], line, err)
	}
}

func sleepBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("sleep")
	if err != nil {
		t.Skipf("no sleep binary on PATH: %v", err)
	}
	if p, err = filepath.EvalSymlinks(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestStreamBoundToConnectingProcess: the identity on a connection is that
// of the process that connected, as it was then. Another process holding
// the connection (a fork, or one it was passed to over SCM_RIGHTS) gets
// what the owner was entitled to while the owner lives unchanged, since
// the owner chose to share it; never the identity of the program the
// owner exec'd into, never anything once the owner exec'd, changed uid
// or exited. Readers run as uid 65534 and print every response.
func TestStreamBoundToConnectingProcess(t *testing.T) {
	needRoot(t)
	exe, _ := helperCopies(t)
	sleep := sleepBinary(t)
	entries := map[string][]string{
		"/owner": {"unix:uid:65534", "unix:path:" + exe},
		"/sleep": {"unix:uid:65534", "unix:path:" + sleep},
		"/root":  {"unix:uid:0"},
	}
	src := newRotatingSource(t, entries, []string{"/owner", "/sleep", "/root"})
	srv := startOpenServer(t, newWorkloadAttestor(t), src)
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}

	const (
		exited   = "the caller exited"
		execed   = "the caller ran another executable since it connected"
		setuided = "the caller changed uid or gid since it connected"
	)
	tests := []boundCase{
		{name: "fork and exec before the call", owner: nobody,
			steps: []string{"exec", "call", "=end PermissionDenied: no identity issued: " + execed},
			audit: []string{`"@message":"no identity issued"`, `"reason":"` + execed + `"`, `"exe":"` + sleep + `"`}},
		{name: "fork, then exec during the stream", owner: nobody,
			steps: []string{"call", "=svid /owner", "exec", "rotate", "=end Unavailable: " + execed},
			audit: []string{`"@message":"ended X.509-SVID stream"`, `"reason":"` + execed + `"`}},
		{name: "setuid during the stream", owner: nil,
			steps: []string{"call", "=svid /root", "setuid", "rotate", "=end Unavailable: " + setuided},
			audit: []string{`"@message":"ended X.509-SVID stream"`, `"reason":"` + setuided + `"`}},
		{name: "owner lives, then exits", owner: nobody,
			steps: []string{"call", "=svid /owner", "rotate", "=svid /owner", "exit", "=end Unavailable: " + exited},
			audit: []string{`"@message":"ended X.509-SVID stream"`, `"reason":"` + exited + `"`}},
		{name: "SCM_RIGHTS, then the owner exits", pass: true, owner: nil,
			steps: []string{"call", "=svid /root", "exit", "=end Unavailable: " + exited, "rotate"},
			audit: []string{`"@message":"ended X.509-SVID stream"`, `"reason":"` + exited + `"`}},
		{name: "SCM_RIGHTS from an owner already gone", pass: true, owner: nil,
			steps: []string{"exit", "call", "=end Unavailable: caller exited during attestation"},
			audit: []string{`"@message":"caller exited during attestation"`}},
	}
	// Each case runs for the Workload API and for Envoy's SDS, whose
	// streams are bound the same way.
	apis := []struct{ name, reader, ended string }{
		{"x509", "reader", "ended X.509-SVID stream"},
		{"sds", "reader-sds", "ended SDS stream"},
	}
	for _, api := range apis {
		for _, tc := range tests {
			t.Run(api.name+"/"+tc.name, func(t *testing.T) {
				tc.audit = slices.Clone(tc.audit)
				for i, a := range tc.audit {
					tc.audit[i] = strings.Replace(a, "ended X.509-SVID stream", api.ended, 1)
				}
				runBoundCase(t, srv, src, exe, sleep, api.reader, tc)
			})
		}
	}
}

// boundCase is one case of TestStreamBoundToConnectingProcess. A step:
// "call" (the reader opens its stream), "rotate", an owner command
// ("exec", "setuid", "exit"), or "=<line>": the reader's next line must
// be <line>.
type boundCase struct {
	name  string
	pass  bool // the owner passes its connection over SCM_RIGHTS
	owner *syscall.Credential
	steps []string
	audit []string // in one log line, with the owner's pid
}

// runBoundCase runs tc with reader mode readerMode ("reader" or
// "reader-sds").
func runBoundCase(t *testing.T, srv *running, src *rotatingSource, exe, sleep, readerMode string, tc boundCase) {
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	var ownerFD, readerFD *os.File
	if tc.pass {
		pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ownerFD, readerFD = os.NewFile(uintptr(pair[0]), "pass"), os.NewFile(uintptr(pair[1]), "receive")
		readerMode += "-recv"
	} else {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ownerFD = os.NewFile(uintptr(fd), "conn")
		readerFD = ownerFD
	}
	ownerMode := "owner"
	if tc.pass {
		ownerMode = "owner-pass"
	}
	owner := startChild(t, exe, ownerMode, srv.path, tc.owner, ownerFD)
	if l := owner.next(t); l != "ready" {
		t.Fatalf("owner said %q, want ready", l)
	}
	// Started before any exec, with the connection, as a fork.
	reader := startChild(t, exe, readerMode, srv.path, nobody, readerFD)
	if l := reader.next(t); l != "ready" {
		t.Fatalf("reader said %q, want ready", l)
	}
	// Only the two children hold the connection now.
	_ = ownerFD.Close()
	_ = readerFD.Close()
	ownerPID := owner.cmd.Process.Pid

	for _, step := range tc.steps {
		switch {
		case step == "call":
			reader.say(t, "go")
		case step == "rotate":
			src.rotate()
		case step == "exec":
			owner.say(t, "exec")
			testwait.Exe(t, ownerPID, sleep)
		case step == "setuid":
			owner.say(t, "setuid")
			if l := owner.next(t); l != "done" {
				t.Fatalf("owner said %q, want done", l)
			}
		case step == "exit":
			_ = owner.stdin.Close()
			_ = owner.cmd.Wait()
		case strings.HasPrefix(step, "="):
			if got := reader.next(t); got != step[1:] {
				t.Fatalf("reader said %q, want %q\n%s", got, step[1:], srv.logs.String())
			}
		default:
			t.Fatalf("unknown step %q", step)
		}
	}
	// Nothing after the end: the reader exits.
	for l := range reader.lines {
		t.Errorf("reader said %q after its stream ended", l)
	}
	srv.logs.waitForLine(t, append(tc.audit, `"pid":`+strconv.Itoa(ownerPID)+`,`)...)
}

// waitForLine polls until one log line holds every fragment.
func (b *logBuffer) waitForLine(t *testing.T, fragments ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for line := range strings.Lines(b.String()) {
			if !slices.ContainsFunc(fragments, func(f string) bool { return !strings.Contains(line, f) }) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line holds all of %q after 10s:\n%s", fragments, b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

package workloadapi

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	wlclient "github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
)

// TestRealCallers: processes under uid 65534 fetch through a real socket
// and get exactly the entries their uid, gid, executable path and hash
// select; a copy of the executable with one byte changed loses the hash
// entry. One caller runs in its own PID namespace: the kernel hands the
// agent its host PID.
func TestRealCallers(t *testing.T) {
	needRoot(t)
	exe, changed := helperCopies(t)
	sum, changedSum := sha256File(t, exe), sha256File(t, changed)
	entries := map[string][]string{
		"/nobody":        {"unix:uid:65534"},
		"/by-hash":       {"unix:uid:65534", "unix:sha256:" + sum},
		"/by-path":       {"unix:gid:65534", "unix:path:" + exe},
		"/root":          {"unix:uid:0"},
		"/hash-wrong-id": {"unix:uid:1", "unix:sha256:" + sum},
		"/changed":       {"unix:sha256:" + changedSum},
	}
	order := []string{"/root", "/by-hash", "/changed", "/nobody", "/hash-wrong-id", "/by-path"}
	ca := newTestCA(t)
	srv := startOpenServer(t, newWorkloadAttestor(t), newEntrySource(t, ca, entries, order))

	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	tests := []struct {
		name  string
		exe   string
		attrs *syscall.SysProcAttr
		want  []string
	}{
		{name: "the executable", exe: exe, attrs: &syscall.SysProcAttr{Credential: nobody},
			want: []string{"/by-hash", "/nobody", "/by-path"}},
		{name: "one byte changed", exe: changed, attrs: &syscall.SysProcAttr{Credential: nobody},
			want: []string{"/changed", "/nobody"}},
		{name: "own PID namespace", exe: exe, attrs: &syscall.SysProcAttr{Credential: nobody, Cloneflags: syscall.CLONE_NEWPID},
			want: []string{"/by-hash", "/nobody", "/by-path"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := helperCmd(tc.exe, "fetch", srv.path)
			cmd.SysProcAttr = tc.attrs
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("caller: %v\n%s%s", err, out, stderr.String())
			}
			var got []string
			for _, l := range strings.Fields(string(out)) {
				got = append(got, strings.TrimPrefix(l, "spiffe://example.org"))
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("SVIDs served (-want +got):\n%s", diff)
			}
			// The host PID, not the namespace's 1, is what was attested.
			srv.logs.waitFor(t, `"pid":`+strconv.Itoa(cmd.Process.Pid)+",")
		})
	}
}

// connectAs has a child running exe connect a socket to the server and
// returns the socket. The kernel records the child, not this process, as
// the caller; mode says what the child does next.
func connectAs(t *testing.T, exe, mode, socket string, cred *syscall.Credential) (*os.File, *exec.Cmd) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "caller-socket")
	cmd := helperCmd(exe, mode, socket)
	cmd.ExtraFiles = []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	return f, cmd
}

// callOver makes one FetchX509SVID call over the connection in f.
func callOver(t *testing.T, f *os.File) error {
	t.Helper()
	cc, err := clientOver(f)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, securityHeader, "true")
	stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return err
	}
	resp, err := stream.Recv()
	if err == nil {
		return fmt.Errorf("served %d SVIDs, first %s", len(resp.GetSvids()), resp.GetSvids()[0].GetSpiffeId())
	}
	return err
}

// TestCallerExitsBeforeAttestation provokes the race many times through a
// real socket: a child connects and exits, another process takes its PID
// (where the test may steer PIDs), and the socket, still held by the test,
// then asks for SVIDs. Every call must fail with "caller exited during
// attestation"; none may be served the newcomer's (or anyone's) SVIDs.
func TestCallerExitsBeforeAttestation(t *testing.T) {
	needRoot(t)
	exe, _ := helperCopies(t)
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skipf("no sleep binary on PATH: %v", err)
	}
	if sleep, err = filepath.EvalSymlinks(sleep); err != nil {
		t.Fatal(err)
	}
	entries := map[string][]string{
		"/caller": {"unix:uid:65534", "unix:path:" + exe},
		"/decoy":  {"unix:uid:65534", "unix:path:" + sleep},
		"/nobody": {"unix:uid:65534"},
	}
	ca := newTestCA(t)
	srv := startOpenServer(t, newWorkloadAttestor(t), newEntrySource(t, ca, entries, []string{"/caller", "/decoy", "/nobody"}))
	steer := unix.Access("/proc/sys/kernel/ns_last_pid", unix.W_OK) == nil

	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	const rounds = 100
	deadline := time.Now().Add(20 * time.Second)
	reused, done := 0, 0
	for ; done < rounds && time.Now().Before(deadline); done++ {
		f, child := connectAs(t, exe, "connect", srv.path, nobody)
		if out, err := child.CombinedOutput(); err != nil {
			t.Fatalf("round %d: child: %v\n%s", done, err, out)
		}
		var decoy *exec.Cmd
		if steer {
			pid := child.Process.Pid
			if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0); err != nil {
				t.Fatal(err)
			}
			decoy = exec.Command(sleep, "60")
			decoy.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
			if err := decoy.Start(); err != nil {
				t.Fatal(err)
			}
			if decoy.Process.Pid == pid {
				reused++
			}
		}
		err := callOver(t, f)
		_ = f.Close()
		if decoy != nil {
			_ = decoy.Process.Kill()
			_ = decoy.Wait()
		}
		if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "caller exited during attestation" {
			t.Fatalf("round %d: call = %v; want Unavailable: caller exited during attestation", done, err)
		}
	}
	t.Logf("%d rounds, PID taken by another process in %d", done, reused)
	if done < 10 {
		t.Fatalf("only %d rounds in the time allowed", done)
	}
	if steer && reused == 0 {
		t.Errorf("no round got the PID reused; the test did not provoke what it claims")
	}
	srv.logs.waitFor(t, `"@message":"caller exited during attestation"`)
}

// TestCallerChangesUIDAfterConnect: a root process that connects and then
// becomes uid 65534 gets nothing, though /proc now shows a uid with
// entries: PermissionDenied, and an audit line with the reason.
func TestCallerChangesUIDAfterConnect(t *testing.T) {
	needRoot(t)
	exe, _ := helperCopies(t)
	entries := map[string][]string{"/root": {"unix:uid:0"}, "/nobody": {"unix:uid:65534"}}
	ca := newTestCA(t)
	srv := startOpenServer(t, newWorkloadAttestor(t), newEntrySource(t, ca, entries, []string{"/root", "/nobody"}))

	f, child := connectAs(t, exe, "connect-setuid", srv.path, nil)
	defer f.Close()
	stdin, stdout := startPiped(t, child, "connect-setuid")
	defer func() {
		_ = stdin.Close()
		_ = child.Wait()
	}()
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("child said %q, %v; want ready", line, err)
	}

	err := callOver(t, f)
	const reason = "the caller changed uid or gid since it connected"
	if st := status.Convert(err); st.Code() != codes.PermissionDenied || st.Message() != "no identity issued: "+reason {
		t.Fatalf("call = %v; want PermissionDenied: no identity issued: %s", err, reason)
	}
	logs := srv.logs.waitFor(t, `"reason":"`+reason+`"`)
	for _, want := range []string{`"@message":"no identity issued"`, `"pid":` + strconv.Itoa(child.Process.Pid) + ",", `"uid":0`, `"exe":"` + exe + `"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s:\n%s", want, logs)
		}
	}
}

// TestPeerPIDFDClosedWithConnection: each connection's pidfd is closed with
// it, so the server's descriptors return to where they were.
func TestPeerPIDFDClosedWithConnection(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	srv := startServer(t, newWorkloadAttestor(t), src)
	openFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}

	// One call first, so that gRPC's lazily made descriptors exist.
	fetch := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := wlclient.New(ctx, wlclient.WithAddr("unix://"+srv.path))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.FetchX509Context(ctx); err != nil {
			t.Fatalf("FetchX509Context: %v", err)
		}
	}
	fetch()
	base := openFDs()
	for range 20 {
		fetch()
	}
	deadline := time.Now().Add(10 * time.Second)
	for openFDs() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors open after 20 closed connections, %d before", openFDs(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPeerProcessTakesPIDFD: on this kernel the caller arrives pinned.
func TestPeerProcessTakesPIDFD(t *testing.T) {
	dir := socketDir(t)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "s"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	proc, gone, err := peerProcess(c)
	if err != nil || gone != nil {
		t.Fatalf("peerProcess = %v, %v", gone, err)
	}
	defer proc.PIDFD.Close()
	if proc.PID != int32(os.Getpid()) || proc.UID != uint32(os.Geteuid()) || proc.GID != uint32(os.Getegid()) {
		t.Errorf("caller = %+v, want this process", proc)
	}
	if proc.PIDFD == nil {
		t.Fatal("no pidfd")
	}
	// What identifies the process was recorded with the pidfd: its
	// executable (the pidfd from SO_PEERPIDFD needs no start time).
	if proc.Exe == (attestor.FileID{}) {
		t.Errorf("caller = %+v, want an executable", proc)
	}
	// The pidfd names this process: its fdinfo says so.
	info, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(int(proc.PIDFD.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	if want := "Pid:\t" + strconv.Itoa(os.Getpid()) + "\n"; !strings.Contains(string(info), want) {
		t.Errorf("pidfd fdinfo lacks %q:\n%s", want, info)
	}
}

// TestPinPeer covers what the kernel may answer to SO_PEERPIDFD, including
// the fallback for kernels before 6.5, which this host may not be.
func TestPinPeer(t *testing.T) {
	self := attestor.Process{PID: int32(os.Getpid()), UID: uint32(os.Geteuid()), GID: uint32(os.Getegid())}
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Skipf("cannot run true: %v", err)
	}
	exited := attestor.Process{PID: int32(gone.Process.Pid)}
	ownPIDFD := func(t *testing.T) int {
		fd, err := unix.PidfdOpen(os.Getpid(), 0)
		if err != nil {
			t.Fatalf("pidfd_open: %v", err)
		}
		return fd
	}

	tests := []struct {
		name      string
		proc      attestor.Process
		pidfd     func(*testing.T) int
		pidfdErr  error
		wantGone  bool
		wantStart bool // a start time is recorded
		wantErr   string
	}{
		{name: "SO_PEERPIDFD", proc: self, pidfd: ownPIDFD},
		{name: "no SO_PEERPIDFD, pinned by PID", proc: self, pidfdErr: unix.ENOPROTOOPT, wantStart: true},
		{name: "no SO_PEERPIDFD, caller gone", proc: exited, pidfdErr: unix.ENOPROTOOPT, wantGone: true},
		{name: "peer exited, EINVAL", proc: self, pidfdErr: unix.EINVAL, wantGone: true},
		{name: "peer exited, ESRCH", proc: self, pidfdErr: unix.ESRCH, wantGone: true},
		{name: "no peer pid", proc: self, pidfdErr: unix.ENODATA, wantErr: "getsockopt SO_PEERPIDFD: no data available"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fd := -1
			if tc.pidfd != nil {
				fd = tc.pidfd(t)
			}
			got, goneErr, err := pinPeer(tc.proc, fd, tc.pidfdErr)
			if got.PIDFD != nil {
				defer got.PIDFD.Close()
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("pinPeer error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("pinPeer: %v", err)
			}
			if tc.wantGone {
				if !errors.Is(goneErr, attestor.ErrCallerExited) || got.PIDFD != nil {
					t.Fatalf("pinPeer = %+v, gone %v; want no pidfd and ErrCallerExited", got, goneErr)
				}
				return
			}
			if goneErr != nil || got.PIDFD == nil {
				t.Fatalf("pinPeer = %+v, gone %v; want a pidfd", got, goneErr)
			}
			// Either way, what identifies the process is recorded: its
			// executable, and a start time only beside a pidfd opened
			// from the PID.
			if got.Exe == (attestor.FileID{}) || (got.StartTime != 0) != tc.wantStart {
				t.Errorf("pinPeer = %+v, want an executable and a start time: %v", got, tc.wantStart)
			}
			if got.PID != tc.proc.PID || got.UID != tc.proc.UID || got.GID != tc.proc.GID {
				t.Errorf("pinPeer changed the credentials: %+v, want those of %+v", got, tc.proc)
			}
		})
	}
}

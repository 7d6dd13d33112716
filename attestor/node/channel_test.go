package node

import (
	"bytes"
	"crypto"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
)

// tpmResponse builds a response of the given total size: a header whose size
// field says so, then a recognizable body.
func tpmResponse(size int) []byte {
	resp := make([]byte, size)
	binary.BigEndian.PutUint16(resp[0:2], 0x8001)
	binary.BigEndian.PutUint32(resp[2:6], uint32(size))
	for i := tpmHeaderSize; i < size; i++ {
		resp[i] = byte(i)
	}
	return resp
}

// fakeTPMPeer answers each command read from conn with the next of
// responses, written in the given fragment sizes (the remainder goes in one
// last write). It closes conn when done.
func fakeTPMPeer(conn net.Conn, responses [][]byte, fragments []int) {
	defer conn.Close()
	cmd := make([]byte, 64)
	for _, resp := range responses {
		if _, err := conn.Read(cmd); err != nil {
			return
		}
		rest := resp
		for _, n := range fragments {
			if n >= len(rest) {
				break
			}
			if _, err := conn.Write(rest[:n]); err != nil {
				return
			}
			rest = rest[n:]
		}
		if _, err := conn.Write(rest); err != nil {
			return
		}
	}
}

func TestFramedChannelReadsWholeResponses(t *testing.T) {
	big := tpmResponse(6000) // larger than go-tpm's 4096-byte read and our first buffer
	tests := []struct {
		name      string
		responses [][]byte
		fragments []int
		readSize  int // the buffer go-tpm reads into
	}{
		{"whole response in one write, like a device", [][]byte{tpmResponse(300)}, nil, 4096},
		{"header split", [][]byte{tpmResponse(300)}, []int{3, 4, 100}, 4096},
		{"one byte at a time", [][]byte{tpmResponse(40)}, []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, 4096},
		{"header only", [][]byte{tpmResponse(tpmHeaderSize)}, []int{5}, 4096},
		{"two commands", [][]byte{tpmResponse(100), tpmResponse(2000)}, []int{10, 500}, 4096},
		{"response larger than a read", [][]byte{big}, []int{1000, 2000}, 4096},
		{"small reader buffer", [][]byte{tpmResponse(300)}, []int{7}, 64},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			go fakeTPMPeer(server, tc.responses, tc.fragments)
			ch := newFramedChannel(client, "pipe")
			defer ch.Close()
			for i, want := range tc.responses {
				if _, err := ch.Write([]byte("command")); err != nil {
					t.Fatalf("command %d: Write: %v", i, err)
				}
				var got []byte
				buf := make([]byte, tc.readSize)
				for len(got) < len(want) {
					n, err := ch.Read(buf)
					if err != nil {
						t.Fatalf("command %d: Read after %d bytes: %v", i, len(got), err)
					}
					got = append(got, buf[:n]...)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("command %d: got %d bytes, not the %d-byte response sent", i, len(got), len(want))
				}
			}
		})
	}
}

func TestFramedChannelFirstReadIsTheWholeResponse(t *testing.T) {
	// go-tpm reads a response with one Read: a fragmented response must
	// still come back whole from that one call.
	client, server := net.Pipe()
	want := tpmResponse(1500)
	go fakeTPMPeer(server, [][]byte{want}, []int{2, 8, 700})
	ch := newFramedChannel(client, "pipe")
	defer ch.Close()
	if _, err := ch.Write([]byte("command")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	n, err := ch.Read(buf)
	if err != nil || !bytes.Equal(buf[:n], want) {
		t.Fatalf("Read() = %d bytes, %v; want the whole %d-byte response", n, err, len(want))
	}
}

func TestFramedChannelBrokenPeer(t *testing.T) {
	badSize := tpmResponse(20)
	binary.BigEndian.PutUint32(badSize[2:6], 4) // smaller than a header
	huge := tpmResponse(20)
	binary.BigEndian.PutUint32(huge[2:6], 1<<30)
	tests := []struct {
		name string
		send []byte // written whole, then the peer hangs up
	}{
		{"size below header", badSize},
		{"absurd size", huge},
		{"hang-up inside the header", tpmResponse(20)[:6]},
		{"hang-up inside the body", tpmResponse(200)[:50]},
		{"more bytes than announced", append(tpmResponse(20), 1, 2, 3)},
		{"nothing", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			go func() {
				defer server.Close()
				cmd := make([]byte, 64)
				if _, err := server.Read(cmd); err != nil {
					return
				}
				if len(tc.send) > 0 {
					server.Write(tc.send)
				}
			}()
			ch := newFramedChannel(client, "pipe /x")
			defer ch.Close()
			if _, err := ch.Write([]byte("command")); err != nil {
				t.Fatal(err)
			}
			n, err := ch.Read(make([]byte, 4096))
			if err == nil {
				t.Fatalf("Read() = %d bytes, nil error; want an error", n)
			}
			if want := "pipe /x"; !bytes.Contains([]byte(err.Error()), []byte(want)) {
				t.Errorf("error %q does not name the channel %q", err, want)
			}
		})
	}
}

func TestFramedChannelHasNoEventLog(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	ch := newFramedChannel(client, "socket /run/swtpm.sock")
	defer ch.Close()
	if _, err := ch.MeasurementLog(); !errors.Is(err, errNoEventLog) {
		t.Fatalf("MeasurementLog() error = %v, want errNoEventLog", err)
	}
}

// failingConn fails every write, as a socket whose peer is gone.
type failingConn struct{ io.ReadWriteCloser }

func (failingConn) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }

func TestFramedChannelWriteError(t *testing.T) {
	ch := newFramedChannel(failingConn{}, "socket /gone")
	if _, err := ch.Write([]byte("command")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Write() error = %v, want io.ErrClosedPipe", err)
	}
}

// startSwtpm runs `swtpm socket` on a fresh state directory and returns its
// socket path; the process is killed at cleanup.
func startSwtpm(t *testing.T) string {
	t.Helper()
	sock, _ := startSwtpmProcess(t)
	return sock
}

// startSwtpmProcess is startSwtpm that also returns the swtpm process, for
// tests that kill it.
func startSwtpmProcess(t *testing.T) (string, *os.Process) {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		t.Skip("swtpm is not installed: the socket transport is tested against the simulator framing only")
	}
	dir, err := os.MkdirTemp("", "ly") // short: sun_path holds 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "tpm.sock")
	cmd := exec.Command(bin, "socket", "--tpm2", "--server", "type=unixio,path="+sock,
		"--tpmstate", "dir="+state, "--flags", "not-need-init,startup-clear")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// The socket file appears at bind, before swtpm listens: only a
	// connection that succeeds says it serves (it takes the next one once
	// this one hangs up).
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock, cmd.Process
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not create %s: %s", sock, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leaveObjectsLoaded fills the TPM's object slots over a raw connection and
// hangs up without flushing them, as a crashed agent would.
func leaveObjectsLoaded(t *testing.T, sock string, n int) {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch := newFramedChannel(conn, "socket "+sock)
	tmpl := tpm2.Public{
		Type:    tpm2.AlgECC,
		NameAlg: tpm2.AlgSHA256,
		Attributes: tpm2.FlagSign | tpm2.FlagFixedTPM | tpm2.FlagFixedParent |
			tpm2.FlagSensitiveDataOrigin | tpm2.FlagUserWithAuth,
		ECCParameters: &tpm2.ECCParams{
			Sign:    &tpm2.SigScheme{Alg: tpm2.AlgECDSA, Hash: tpm2.AlgSHA256},
			CurveID: tpm2.CurveNISTP256,
		},
	}
	for i := range n {
		if _, _, err := tpm2.CreatePrimary(ch, tpm2.HandleOwner, tpm2.PCRSelection{}, "", "", tmpl); err != nil {
			t.Fatalf("load object %d: %v", i, err)
		}
	}
}

func TestOpenTPMSocket(t *testing.T) {
	sock := startSwtpm(t)
	leaveObjectsLoaded(t, sock, 3)

	tpm, err := OpenTPM(TPMConfig{Socket: sock})
	if err != nil {
		t.Fatalf("OpenTPM: %v", err)
	}
	defer tpm.Close()

	t.Run("a second client gets a clear error", func(t *testing.T) {
		_, err := openSocket(sock, 200*time.Millisecond)
		if err == nil || !strings.Contains(err.Error(), "another process") || !strings.Contains(err.Error(), sock) {
			t.Fatalf("openSocket() error = %v, want a timeout naming %s", err, sock)
		}
	})
	t.Run("attest and renew", func(t *testing.T) {
		info, err := tpm.Info()
		if err != nil {
			t.Fatalf("Info: %v", err)
		}
		rules := []Rule{{Name: "lab", EKSHA256: []string{info.EKSHA256}}}
		var old *Session
		for round := range 3 {
			start := time.Now()
			sess, err := tpm.NewSession()
			if err != nil {
				t.Fatalf("round %d: NewSession: %v", round, err)
			}
			defer sess.Close()
			ev, err := sess.Evidence()
			if err != nil {
				t.Fatal(err)
			}
			ch, err := NewChallenge(ev, rules, nil, time.Now())
			if err != nil {
				t.Fatalf("round %d: NewChallenge: %v", round, err)
			}
			answer, err := sess.Activate(ch.Credential())
			if err != nil {
				t.Fatalf("round %d: Activate: %v", round, err)
			}
			if _, err := ch.Verify(answer); err != nil {
				t.Fatalf("round %d: Verify: %v", round, err)
			}
			t.Logf("round %d: attestation took %v", round, time.Since(start))
			digest := make([]byte, 32)
			if old != nil {
				if _, err := old.Signer().Sign(nil, digest, crypto.SHA256); err != nil {
					t.Fatalf("round %d: old key: %v", round, err)
				}
				old.Close()
			}
			old = sess
		}
	})
}

// TestFramedChannelBreaksForGood: after one failed command every later one
// fails at once with the same ErrTPMUnreachable, without touching the
// stream again (it is out of step with the TPM, or the TPM is gone).
func TestFramedChannelBreaksForGood(t *testing.T) {
	client, server := net.Pipe()
	go fakeTPMPeer(server, [][]byte{tpmResponse(20)}, nil) // answers once, then hangs up
	ch := newFramedChannel(client, "pipe")
	defer ch.Close()
	buf := make([]byte, 4096)
	if _, err := ch.Write([]byte("cmd1")); err != nil {
		t.Fatalf("first command: %v", err)
	}
	if _, err := ch.Read(buf); err != nil {
		t.Fatalf("first response: %v", err)
	}
	if err := ch.err(); err != nil {
		t.Fatalf("channel broken after a good exchange: %v", err)
	}
	_, werr := ch.Write([]byte("cmd2"))
	_, rerr := ch.Read(buf)
	first := errors.Join(werr, rerr)
	if !errors.Is(first, ErrTPMUnreachable) || !strings.Contains(first.Error(), "pipe") {
		t.Fatalf("command to a closed peer: %v, want ErrTPMUnreachable naming the channel", first)
	}
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"write", func() error { _, err := ch.Write([]byte("cmd3")); return err }},
		{"read", func() error { _, err := ch.Read(buf); return err }},
	} {
		if err := op.do(); err == nil || err.Error() != ch.err().Error() || !errors.Is(err, ErrTPMUnreachable) {
			t.Errorf("%s after the failure: %v, want the first error %v", op.name, err, ch.err())
		}
	}
}

// TestTPMUnreachableWhenSwtpmDies: a TPM whose swtpm is killed reports
// ErrTPMUnreachable from Probe and Err, and every operation fails fast,
// so the agent knows to open it again.
func TestTPMUnreachableWhenSwtpmDies(t *testing.T) {
	sock, proc := startSwtpmProcess(t)
	tpm, err := OpenTPM(TPMConfig{Socket: sock})
	if err != nil {
		t.Fatalf("OpenTPM: %v", err)
	}
	defer tpm.Close()
	if err := tpm.Probe(); err != nil {
		t.Fatalf("Probe of a live TPM: %v", err)
	}
	if err := tpm.Err(); err != nil {
		t.Fatalf("Err of a live TPM: %v", err)
	}
	if err := proc.Kill(); err != nil {
		t.Fatal(err)
	}
	proc.Wait()
	if err := tpm.Probe(); !errors.Is(err, ErrTPMUnreachable) || !strings.Contains(err.Error(), sock) {
		t.Fatalf("Probe after swtpm died: %v, want ErrTPMUnreachable naming %s", err, sock)
	}
	if err := tpm.Err(); !errors.Is(err, ErrTPMUnreachable) {
		t.Errorf("Err after swtpm died: %v, want ErrTPMUnreachable", err)
	}
	if _, err := tpm.NewSession(); err == nil {
		t.Error("NewSession on a dead TPM succeeded")
	}
}

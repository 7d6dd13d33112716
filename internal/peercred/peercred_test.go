package peercred

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// pair returns the server end of a real Unix socket connection made by
// this process.
func pair(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	client, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return server
}

func TestRead(t *testing.T) {
	c := pair(t)
	for _, wantPIDFD := range []bool{false, true} {
		cred, err := Read(c, wantPIDFD)
		if err != nil {
			t.Fatalf("Read(%v): %v", wantPIDFD, err)
		}
		if cred.PID != int32(os.Getpid()) || cred.UID != uint32(os.Geteuid()) || cred.GID != uint32(os.Getegid()) {
			t.Errorf("Read(%v) = pid %d uid %d gid %d, want this process's", wantPIDFD, cred.PID, cred.UID, cred.GID)
		}
		switch {
		case !wantPIDFD && (cred.PIDFD != -1 || cred.PIDFDErr != nil):
			t.Errorf("Read(false) asked for a pidfd: %d, %v", cred.PIDFD, cred.PIDFDErr)
		case wantPIDFD && cred.PIDFD >= 0:
			unix.Close(cred.PIDFD)
		case wantPIDFD && !errors.Is(cred.PIDFDErr, unix.ENOPROTOOPT):
			t.Errorf("Read(true): no pidfd and %v, want one or ENOPROTOOPT", cred.PIDFDErr)
		}
	}
}

func TestReadClosed(t *testing.T) {
	c := pair(t)
	c.Close()
	if _, err := Read(c, false); err == nil {
		t.Error("Read on a closed connection succeeded")
	}
}

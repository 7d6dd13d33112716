package adminsock

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"testing"
)

func TestRefused(t *testing.T) {
	root := os.Geteuid() == 0
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"no error", nil, false},
		{"socket mode", fmt.Errorf("dial: %w", syscall.EACCES), true},
		{"not permitted", syscall.EPERM, true},
		{"no socket", fmt.Errorf("dial: %w", syscall.ENOENT), false},
		{"nobody listening", syscall.ECONNREFUSED, false},
		// The daemon hangs up on a peer other than root: for root that
		// cannot be the reason.
		{"hung up", io.EOF, !root},
		{"server closed idle connection", errors.New("http: server closed idle connection"), !root},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Refused(tc.err); got != tc.want {
				t.Errorf("Refused(%v) = %v, want %v (euid %d)", tc.err, got, tc.want, os.Geteuid())
			}
		})
	}
}

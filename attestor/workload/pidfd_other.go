//go:build !linux

package workload

import (
	"errors"
	"fmt"
	"os"
)

// Workload attestation reads /proc and pins callers with pidfds, both
// Linux-only; the package still builds elsewhere (ParseCgroup and the
// attestor names need no kernel), and attestation fails there.

func openPIDFD(int32) (*os.File, error) {
	return nil, fmt.Errorf("pidfd_open: %w", errors.ErrUnsupported)
}

func checkAlive(*os.File) error {
	return fmt.Errorf("check pidfd: %w", errors.ErrUnsupported)
}

func fdKey(int) (exeKey, bool, error) { return exeKey{}, false, nil }

// NewPIDFD fails: there are no pidfds here.
func NewPIDFD(int) (*os.File, error) {
	return nil, fmt.Errorf("pidfd: %w", errors.ErrUnsupported)
}

func readExeID(string) (FileID, error) {
	return FileID{}, fmt.Errorf("stat exe: %w", errors.ErrUnsupported)
}

// pathKey: no file versions here, so nothing is cached.
func pathKey(string) (exeKey, bool, error) { return exeKey{}, false, nil }

// pidfdIDs: no pidfds, so /proc is asked (and fails too).
func pidfdIDs(*os.File) (uint32, uint32, error) { return 0, 0, errNoPidfdInfo }

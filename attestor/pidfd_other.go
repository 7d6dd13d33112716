//go:build !linux

package attestor

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// Workload attestation reads /proc and pins callers with pidfds, both
// Linux-only; the package builds elsewhere for its TPM verifier half.

func openPIDFD(int32) (*os.File, error) {
	return nil, fmt.Errorf("pidfd_open: %w", errors.ErrUnsupported)
}

func checkAlive(*os.File) error {
	return fmt.Errorf("check pidfd: %w", errors.ErrUnsupported)
}

func exeKeyOf(fs.FileInfo) (exeKey, bool) { return exeKey{}, false }

package signer

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// writeBundle writes the CA certificates (public data only) as PEM to path,
// atomically: readers see the old file or the new one, never a torn write.
func writeBundle(path string, cas []*x509.Certificate) error {
	var buf bytes.Buffer
	for _, c := range cas {
		if err := pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}); err != nil {
			return fmt.Errorf("encode bundle: %w", err)
		}
	}
	return writeAtomic(path, buf.Bytes())
}

// readState reads the file name in the state dir dir. A missing file (a
// first start, or a state dir from before the file existed) gives nil data
// and no error; the path is returned for error messages either way.
func readState(dir, name string) (data []byte, path string, err error) {
	path = filepath.Join(dir, name)
	data, err = os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, path, nil
	}
	return data, path, err
}

// writeAtomic writes public data to path through a temporary file and a
// rename, so readers see the old content or the new, never a torn write.
func writeAtomic(path string, data []byte) error { return writeAtomicMode(path, data, 0o644) }

// writeAtomicMode is writeAtomic with the file's mode; the directory is
// synced too, so the rename itself survives a crash.
func writeAtomicMode(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// wrapErr wraps err with step, or is nil when err is.
func wrapErr(step string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", step, err)
}

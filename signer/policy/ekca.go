package policy

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// maxCAFileSize bounds what an ek_ca file may hold; a bundle of every
// manufacturer's CAs is well under it, and a mistaken path (a disk image,
// /dev/zero) must not stall a policy reload.
const maxCAFileSize = 4 << 20

// readCAFile reads the certificates in an ek_ca file (PEM; a single DER
// certificate too, as TPM vendors publish them), through readFile, and
// splits them into self-signed roots and intermediates.
func readCAFile(path string, readFile func(string) ([]byte, error)) (roots, intermediates []*x509.Certificate, err error) {
	data, err := readFile(path)
	if err != nil {
		return nil, nil, err
	}
	certs, err := parseCerts(data)
	if err != nil {
		return nil, nil, fmt.Errorf("%q: %w", path, err)
	}
	if len(certs) == 0 {
		return nil, nil, fmt.Errorf("%q contains no PEM certificate", path)
	}
	for _, c := range certs {
		if isSelfSigned(c) {
			roots = append(roots, c)
		} else {
			intermediates = append(intermediates, c)
		}
	}
	return roots, intermediates, nil
}

// readDiskFile reads an ek_ca file from this host's disk (Parse, Load).
func readDiskFile(path string) ([]byte, error) { return readRegularFile(path, maxCAFileSize) }

// readRegularFile refuses anything but a regular file before opening it,
// because opening a FIFO blocks and a device can be endless.
func readRegularFile(path string, limit int64) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read %q: %w", path, unwrapPathError(err))
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%q is not a regular file", path)
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%q is larger than %d bytes", path, limit)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read %q: %w", path, unwrapPathError(err))
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("cannot read %q: %w", path, unwrapPathError(err))
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%q is larger than %d bytes", path, limit)
	}
	return data, nil
}

// unwrapPathError drops the *fs.PathError wrapper, whose text repeats the
// path the caller's message already names.
func unwrapPathError(err error) error {
	if pe, ok := errors.AsType[*fs.PathError](err); ok {
		return pe.Err
	}
	return err
}

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest, sawPEM := data, false
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		sawPEM = true
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if sawPEM || len(bytes.TrimSpace(data)) == 0 {
		return certs, nil
	}
	// Not PEM at all: perhaps DER. If that fails too, the file simply holds
	// no certificate.
	if c, err := x509.ParseCertificate(data); err == nil {
		certs = append(certs, c)
	}
	return certs, nil
}

// isSelfSigned reports whether c signed itself. Issuer == subject alone is
// not enough: a cross-signed CA can share its subject with its issuer.
func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) &&
		c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

func certPool(certs []*x509.Certificate) *x509.CertPool {
	if len(certs) == 0 {
		return nil
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool
}

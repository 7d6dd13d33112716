package swtpmtest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	x509ext "github.com/google/go-attestation/x509"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

const (
	tpmSTNoSessions   = 0x8001
	tpmCCGetRandom    = 0x0000017b
	tpmRCSuccess      = 0x000
	tpmRCCommandCode  = 0x143
	tpmHeaderSize     = 10
	maxTPMResponse    = 4096
	rsaEKHandle       = 0x81010001
	ioDeadline        = 30 * time.Second
	swtpmManufacturer = "id:00001014" // IBM's TCG vendor ID, which swtpm reports
)

// TestStartServesRawCommands speaks the TPM 2.0 wire format by hand over the
// socket, the way the agent's transport will: no library between the test
// and swtpm.
func TestStartServesRawCommands(t *testing.T) {
	t.Parallel()
	tpm := Start(t)

	tests := []struct {
		name    string
		cmd     []byte
		wantRC  uint32
		wantLen int // bytes of randomness in a successful GetRandom response
	}{
		{name: "get random 16 bytes", cmd: getRandomCmd(16), wantRC: tpmRCSuccess, wantLen: 16},
		{name: "get random 1 byte", cmd: getRandomCmd(1), wantRC: tpmRCSuccess, wantLen: 1},
		{name: "get random 0 bytes", cmd: getRandomCmd(0), wantRC: tpmRCSuccess, wantLen: 0},
		// The TPM caps one GetRandom at its largest digest (SHA-512 here).
		{name: "get random capped at 64 bytes", cmd: getRandomCmd(200), wantRC: tpmRCSuccess, wantLen: 64},
		{name: "unknown command code", cmd: rawCmd(0x0000ffff, nil), wantRC: tpmRCCommandCode},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn := dial(t, tpm.Socket)
			tag, rc, body := transmit(t, conn, tc.cmd)
			if tag != tpmSTNoSessions {
				t.Errorf("response tag = %#04x, want %#04x", tag, tpmSTNoSessions)
			}
			if rc != tc.wantRC {
				t.Fatalf("response code = %#x, want %#x", rc, tc.wantRC)
			}
			if rc != tpmRCSuccess {
				if len(body) != 0 {
					t.Errorf("error response carries %d body bytes, want 0", len(body))
				}
				return
			}
			// TPM2B_DIGEST randomBytes: a uint16 size and that many bytes.
			if len(body) < 2 {
				t.Fatalf("GetRandom body is %d bytes, want at least 2", len(body))
			}
			n := int(binary.BigEndian.Uint16(body))
			if n != tc.wantLen || len(body) != 2+n {
				t.Errorf("GetRandom returned size %d in a %d-byte body, want %d random bytes", n, len(body), tc.wantLen)
			}
		})
	}
}

// TestKillAndRestart: a killed swtpm stops answering on its socket; the
// restarted one answers on the same path, with the same EK (same state).
func TestKillAndRestart(t *testing.T) {
	t.Parallel()
	tpm := Start(t)
	ekBefore := readEKPublic(t, tpm.Socket)
	tpm.Kill(t)
	if c, err := net.DialTimeout("unix", tpm.Socket, time.Second); err == nil {
		c.Close()
		t.Fatal("the socket of a killed swtpm still accepts connections")
	}
	tpm.Restart(t)
	if got := readEKPublic(t, tpm.Socket); !bytes.Equal(got, ekBefore) {
		t.Error("the restarted swtpm has another EK: its state was not kept")
	}
}

// readEKPublic reads the RSA EK's public area over a fresh connection.
func readEKPublic(t *testing.T, sock string) []byte {
	t.Helper()
	conn := dial(t, sock)
	defer conn.Close()
	h := make([]byte, 4)
	binary.BigEndian.PutUint32(h, rsaEKHandle)
	_, rc, body := transmit(t, conn, rawCmd(0x00000173, h)) // TPM2_ReadPublic
	if rc != tpmRCSuccess {
		t.Fatalf("ReadPublic of the EK: response code %#x", rc)
	}
	return body
}

// TestEKCertificate checks what the signer's verifier will rely on: Go's
// x509 parses swtpm's EK certificate, go-attestation reads its TCG fields,
// and it chains to ek-ca.pem only when the verifier does what EK
// certificates need.
func TestEKCertificate(t *testing.T) {
	t.Parallel()
	tpm := Start(t)
	der := readCertDER(t, tpm.EKCertPath)

	cert, err := attest.ParseEKCertificate(der)
	if err != nil {
		t.Fatalf("attest.ParseEKCertificate: %v", err)
	}
	if cert.SerialNumber.Sign() <= 0 {
		t.Errorf("EK certificate serial %v is not positive", cert.SerialNumber)
	}
	ek, err := x509ext.ToEKCertificate(cert)
	if err != nil {
		t.Fatalf("x509ext.ToEKCertificate: %v", err)
	}
	t.Logf("EK certificate: serial %v, subject %q, issuer %q, manufacturer %q, model %q, version %q, spec %+v",
		ek.SerialNumber, ek.Subject, ek.Issuer, ek.TpmManufacturer, ek.TpmModel, ek.TpmVersion, ek.TpmSpecification)

	if ek.TpmManufacturer != swtpmManufacturer {
		t.Errorf("manufacturer = %q, want %q", ek.TpmManufacturer, swtpmManufacturer)
	}
	if ek.TpmModel != "swtpm" {
		t.Errorf("model = %q, want %q", ek.TpmModel, "swtpm")
	}
	if ek.TpmVersion == "" {
		t.Error("version is empty")
	}
	if ek.TpmSpecification.Family != "2.0" {
		t.Errorf("TPM spec family = %q, want 2.0", ek.TpmSpecification.Family)
	}
	if !ek.HasEkcExtendedKeyUsage {
		t.Error("EK certificate lacks the tcg-kp-EKCertificate extended key usage")
	}
	if len(ek.UnhandledCriticalExtensions) != 0 {
		t.Errorf("unhandled critical extensions left after ToEKCertificate: %v", ek.UnhandledCriticalExtensions)
	}
	if pub, ok := ek.PublicKey.(*rsa.PublicKey); !ok || pub.N.BitLen() != 2048 {
		t.Errorf("EK public key is %T, want RSA 2048", ek.PublicKey)
	}

	roots, intermediates := loadCAs(t, tpm.EKCAPath)
	raw, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("x509.ParseCertificate: %v", err)
	}
	anyUsage := []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
	tests := []struct {
		name    string
		cert    *x509.Certificate
		opts    x509.VerifyOptions
		wantErr error // nil, or a zero value of the error type wanted
	}{
		{
			name: "chains to ek-ca.pem",
			cert: ek.Certificate,
			opts: x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: anyUsage},
		},
		{
			// crypto/x509 alone leaves the critical TCG subjectAltName
			// unhandled: the verifier must go through ToEKCertificate.
			name:    "plain crypto/x509 certificate is rejected",
			cert:    raw,
			opts:    x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: anyUsage},
			wantErr: x509.UnhandledCriticalExtension{},
		},
		{
			// The EK certificate's only EKU is tcg-kp-EKCertificate, so
			// Verify's default (server auth) refuses it.
			name:    "default key usages are rejected",
			cert:    ek.Certificate,
			opts:    x509.VerifyOptions{Roots: roots, Intermediates: intermediates},
			wantErr: x509.CertificateInvalidError{},
		},
		{
			name:    "root without the issuer certificate",
			cert:    ek.Certificate,
			opts:    x509.VerifyOptions{Roots: roots, KeyUsages: anyUsage},
			wantErr: x509.UnknownAuthorityError{},
		},
		{
			name:    "foreign root",
			cert:    ek.Certificate,
			opts:    x509.VerifyOptions{Roots: foreignRoot(t), Intermediates: intermediates, KeyUsages: anyUsage},
			wantErr: x509.UnknownAuthorityError{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chains, err := tc.cert.Verify(tc.opts)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if got := len(chains[0]); got != 3 {
					t.Errorf("chain length = %d, want 3 (EK, issuer, root)", got)
				}
				return
			}
			if err == nil {
				t.Fatal("Verify succeeded, want an error")
			}
			if !sameErrorType(err, tc.wantErr) {
				t.Errorf("Verify error = %T (%v), want %T", err, err, tc.wantErr)
			}
		})
	}
}

// TestEKInTPM checks that the TPM itself holds what the files describe: the
// certificate in NV 0x01c00002, as go-attestation reads it, and the RSA EK
// that certificate certifies at its persistent handle.
func TestEKInTPM(t *testing.T) {
	t.Parallel()
	tpm := Start(t)
	der := readCertDER(t, tpm.EKCertPath)

	// swtpm serves one connection at a time, so both libraries share one.
	conn := dial(t, tpm.Socket)
	at, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: commandChannel{conn}})
	if err != nil {
		t.Fatalf("attest.OpenTPM: %v", err)
	}
	info, err := at.Info()
	if err != nil {
		t.Fatalf("TPM info: %v", err)
	}
	t.Logf("TPM info: manufacturer %v, vendor %q, firmware %d.%d", info.Manufacturer, info.VendorInfo, info.FirmwareVersionMajor, info.FirmwareVersionMinor)

	eks, err := at.EKCertificates()
	if err != nil {
		t.Fatalf("EKCertificates: %v", err)
	}
	var found bool
	for _, ek := range eks {
		if string(ek.Certificate.Raw) == string(der) {
			found = true
		}
	}
	if !found {
		t.Fatalf("none of the TPM's %d EK certificates matches %s", len(eks), tpm.EKCertPath)
	}

	pub, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(rsaEKHandle)}.Execute(transport.FromReadWriter(conn))
	if err != nil {
		t.Fatalf("ReadPublic %#x: %v", rsaEKHandle, err)
	}
	area, err := pub.OutPublic.Contents()
	if err != nil {
		t.Fatalf("decode EK public area: %v", err)
	}
	key, err := tpm2.Pub(*area)
	if err != nil {
		t.Fatalf("convert EK public key: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("parse EK certificate: %v", err)
	}
	rsaKey, ok := key.(*rsa.PublicKey)
	if !ok || !rsaKey.Equal(cert.PublicKey) {
		t.Errorf("EK at %#x (%T) is not the key in the EK certificate", rsaEKHandle, key)
	}
}

// commandChannel adapts a socket to go-attestation's command channel; swtpm
// has no firmware event log to offer.
type commandChannel struct{ net.Conn }

func (commandChannel) MeasurementLog() ([]byte, error) {
	return nil, errors.New("swtpm has no measurement log")
}

func getRandomCmd(n uint16) []byte {
	return rawCmd(tpmCCGetRandom, binary.BigEndian.AppendUint16(nil, n))
}

// rawCmd frames a session-less TPM 2.0 command: tag, total size, code, body.
func rawCmd(code uint32, body []byte) []byte {
	cmd := binary.BigEndian.AppendUint16(nil, tpmSTNoSessions)
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpmHeaderSize+len(body)))
	cmd = binary.BigEndian.AppendUint32(cmd, code)
	return append(cmd, body...)
}

func dial(t *testing.T, socket string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatalf("dial %s: %v", socket, err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.SetDeadline(time.Now().Add(ioDeadline)); err != nil {
		t.Fatalf("set deadline: %v", err)
	}
	return conn
}

// transmit sends one command and reads exactly one response, checking that
// its header's size matches what arrived.
func transmit(t *testing.T, conn net.Conn, cmd []byte) (tag uint16, rc uint32, body []byte) {
	t.Helper()
	if _, err := conn.Write(cmd); err != nil {
		t.Fatalf("write command: %v", err)
	}
	hdr := make([]byte, tpmHeaderSize)
	if _, err := io.ReadFull(conn, hdr); err != nil {
		t.Fatalf("read response header: %v", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < tpmHeaderSize || size > maxTPMResponse {
		t.Fatalf("response size %d out of range [%d, %d]", size, tpmHeaderSize, maxTPMResponse)
	}
	body = make([]byte, size-tpmHeaderSize)
	if _, err := io.ReadFull(conn, body); err != nil {
		t.Fatalf("read %d-byte response body: %v", len(body), err)
	}
	return binary.BigEndian.Uint16(hdr[0:2]), binary.BigEndian.Uint32(hdr[6:10]), body
}

func readCertDER(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read EK certificate: %v", err)
	}
	block, rest := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" || len(rest) != 0 {
		t.Fatalf("%s is not exactly one PEM certificate", path)
	}
	return block.Bytes
}

// loadCAs splits ek-ca.pem the way a verifier should: self-signed
// certificates are roots, the rest intermediates. It also checks that the
// file holds public CA certificates and nothing else.
func loadCAs(t *testing.T, path string) (roots, intermediates *x509.CertPool) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read EK CA file: %v", err)
	}
	roots, intermediates = x509.NewCertPool(), x509.NewCertPool()
	var nRoots, nIntermediates int
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			t.Fatalf("%s holds a %q PEM block; it must hold certificates only", path, block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("parse CA certificate in %s: %v", path, err)
		}
		if !cert.IsCA {
			t.Errorf("%s: %q is not a CA certificate", path, cert.Subject)
		}
		if cert.CheckSignatureFrom(cert) == nil {
			roots.AddCert(cert)
			nRoots++
		} else {
			intermediates.AddCert(cert)
			nIntermediates++
		}
	}
	if nRoots != 1 || nIntermediates != 1 {
		t.Fatalf("%s holds %d roots and %d intermediates, want 1 and 1", path, nRoots, nIntermediates)
	}
	return roots, intermediates
}

// foreignRoot is a CA that signed nothing of swtpm's.
func foreignRoot(t *testing.T) *x509.CertPool {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("generate key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "swtpm-localca-rootca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatalf("create foreign root: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("parse foreign root: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool
}

// sameErrorType reports whether err is, or wraps, an error of want's type.
func sameErrorType(err, want error) bool {
	for ; err != nil; err = errors.Unwrap(err) {
		if fmt.Sprintf("%T", err) == fmt.Sprintf("%T", want) {
			return true
		}
	}
	return false
}

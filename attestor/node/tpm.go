package node

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/google/go-attestation/attest"
	x509ext "github.com/google/go-attestation/x509"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// socketProbeTimeout bounds the first command on a TPM socket. swtpm serves
// one connection at a time, so a socket held by another process (a running
// agent) accepts our connection and then never answers.
const socketProbeTimeout = 5 * time.Second

// akAlgorithm is the AK's key type. Every attestation creates a fresh AK,
// and generating an RSA key inside a TPM takes from a hundred milliseconds
// (swtpm) to seconds (hardware); a P-256 AK takes a few milliseconds.
// go-attestation v0.6.4 verifies key certification by ECDSA AKs, and
// credential activation does not depend on the AK's type.
const akAlgorithm = attest.ECDSA

// TPMConfig is the agent's tpm block: where the TPM is (exactly one of
// Device or Socket, what OpenTPM reads) and how a long-lived holder watches
// it (ProbeInterval, ReopenMax: the agent's, OpenTPM ignores them).
type TPMConfig struct {
	// Device is a TPM character device, normally the kernel resource
	// manager /dev/tpmrm0.
	Device string
	// Socket is a Unix socket carrying the raw TPM 2.0 command stream, as
	// `swtpm socket --server type=unixio,path=...` serves. There is no
	// resource manager behind it, so the agent must be its only user.
	Socket string
	// ProbeInterval is how often the TPM is probed while nothing uses it
	// (probe_interval); zero means the agent's default.
	ProbeInterval time.Duration
	// ReopenMax caps the backoff between attempts to open a lost TPM
	// again (reopen_max_interval); zero means the agent's default.
	ReopenMax time.Duration
}

// TPM is an open TPM: the agent half of node attestation. It is safe for
// concurrent use: every TPM command, including a Sign through
// Session.Signer, is serialized by one mutex, because the command stream
// carries one command at a time.
type TPM struct {
	mu     sync.Mutex
	ch     *framedChannel // what at talks through: Err and Probe look at it
	at     *attest.TPM
	ek     *attest.EK // read once: the EK never changes, and reading it may create a primary key
	closed bool
}

// OpenTPM opens the TPM that cfg names. It is the one function that opens a
// TPM device or socket; its errors name the path. Behind a socket it first
// flushes what an earlier client (a crashed agent) left loaded.
func OpenTPM(cfg TPMConfig) (*TPM, error) {
	switch {
	case cfg.Device != "" && cfg.Socket != "":
		return nil, errors.New("attestor: TPM config names both a device and a socket")
	case cfg.Device != "":
		f, err := os.OpenFile(cfg.Device, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("attestor: open TPM device %s: %w", cfg.Device, err)
		}
		t, err := open(newFramedChannel(f, "device "+cfg.Device))
		if err != nil {
			return nil, fmt.Errorf("attestor: TPM device %s: %w", cfg.Device, err)
		}
		return t, nil
	case cfg.Socket != "":
		return openSocket(cfg.Socket, socketProbeTimeout)
	default:
		return nil, errors.New("attestor: TPM config names neither a device nor a socket")
	}
}

// openSocket opens a TPM socket; probe bounds the first command.
func openSocket(path string, probe time.Duration) (*TPM, error) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return nil, fmt.Errorf("attestor: dial TPM socket %s: %w", path, err)
	}
	ch := newFramedChannel(conn, "socket "+path)
	if err := flushStale(ch, conn, probe); err != nil {
		conn.Close()
		return nil, fmt.Errorf("attestor: TPM socket %s: %w", path, err)
	}
	t, err := open(ch)
	if err != nil {
		return nil, fmt.Errorf("attestor: TPM socket %s: %w", path, err)
	}
	return t, nil
}

// OpenTPMChannel opens a TPM reached through ch, which carries the raw TPM 2.0
// command stream. It is the door tests use for the go-tpm-tools simulator.
func OpenTPMChannel(ch io.ReadWriteCloser) (*TPM, error) {
	t, err := open(newFramedChannel(ch, "command channel"))
	if err != nil {
		return nil, fmt.Errorf("attestor: TPM command channel: %w", err)
	}
	return t, nil
}

// open hands ch to go-attestation and checks that a TPM answers, so a wrong
// path fails at start rather than at the first attestation. It closes ch on
// failure.
func open(ch *framedChannel) (*TPM, error) {
	at, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: ch})
	if err != nil {
		ch.Close()
		return nil, fmt.Errorf("open: %w", err)
	}
	if _, err := at.Info(); err != nil {
		at.Close()
		return nil, fmt.Errorf("read TPM properties: %w", err)
	}
	return &TPM{ch: ch, at: at}, nil
}

// flushStale flushes the transient objects and loaded sessions an earlier
// client (a crashed agent) left in a TPM behind a socket: without a resource
// manager they stay loaded, and swtpm has only three object slots. Its first
// command runs under the probe deadline (see socketProbeTimeout).
func flushStale(ch io.ReadWriter, conn net.Conn, probe time.Duration) error {
	if err := conn.SetDeadline(time.Now().Add(probe)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	_, _, err := tpm2.GetCapability(ch, tpm2.CapabilityTPMProperties, 1, uint32(tpm2.Manufacturer))
	var nerr net.Error
	if errors.As(err, &nerr) && nerr.Timeout() {
		return fmt.Errorf("no answer within %v (is another process holding the socket?): %w", probe, err)
	}
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("clear deadline: %w", err)
	}
	for _, first := range []uint32{uint32(tpm2.TransientFirst), uint32(tpm2.LoadedSessionFirst)} {
		handles, _, err := tpm2.GetCapability(ch, tpm2.CapabilityHandles, 64, first)
		if err != nil {
			return fmt.Errorf("list loaded handles: %w", err)
		}
		for _, h := range handles {
			if hnd, ok := h.(tpmutil.Handle); ok {
				if err := tpm2.FlushContext(ch, hnd); err != nil {
					return fmt.Errorf("flush stale handle 0x%x: %w", uint32(hnd), err)
				}
			}
		}
	}
	return nil
}

// Close closes the TPM. Sessions still open lose their keys with it. Closing
// twice is harmless.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	if err := t.at.Close(); err != nil {
		return fmt.Errorf("attestor: close TPM: %w", err)
	}
	return nil
}

// Info is what an operator pastes into policy (`lanyard-agent tpm info`).
type Info struct {
	EKSHA256        string            // hex SHA-256 of the EK's PKIX public key, the value of a policy ek_sha256 pin
	Manufacturer    string            // TPM_PT_MANUFACTURER by name ("IBM"), or "id:<hex>" when go-attestation has no name for it
	FirmwareVersion string            // "major.minor"
	EKCertificate   *x509.Certificate // nil when the TPM has none
	// From the EK certificate's TCG subjectAltName; empty without a
	// certificate or when it does not follow the TCG EK profile.
	CertManufacturer, CertModel, CertVersion string
}

// Info reads the TPM's identity.
func (t *TPM) Info() (*Info, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrTPMClosed
	}
	ti, err := t.at.Info()
	if err != nil {
		return nil, fmt.Errorf("attestor: read TPM properties: %w", err)
	}
	ek, err := t.endorsementKey()
	if err != nil {
		return nil, err
	}
	hash, err := ekSHA256(ek.Public)
	if err != nil {
		return nil, fmt.Errorf("attestor: hash EK: %w", err)
	}
	info := &Info{
		EKSHA256:        hash,
		Manufacturer:    ti.Manufacturer.String(),
		FirmwareVersion: fmt.Sprintf("%d.%d", ti.FirmwareVersionMajor, ti.FirmwareVersionMinor),
	}
	if info.Manufacturer == "" {
		info.Manufacturer = fmt.Sprintf("id:%08X", uint32(ti.Manufacturer))
	}
	if ek.Certificate != nil {
		// Parse a copy: ToEKCertificate edits the certificate it is given.
		cert, err := x509.ParseCertificate(ek.Certificate.Raw)
		if err != nil {
			return nil, fmt.Errorf("attestor: parse EK certificate: %w", err)
		}
		info.EKCertificate = cert
		if ekc, err := x509ext.ToEKCertificate(cert); err == nil {
			info.CertManufacturer, info.CertModel, info.CertVersion = ekc.TpmManufacturer, ekc.TpmModel, ekc.TpmVersion
		}
	}
	return info, nil
}

// endorsementKey returns the RSA EK (go-attestation activates credentials
// with the RSA EK at 0x81010001), with its certificate when NV 0x01c00002
// holds one. The caller holds t.mu.
func (t *TPM) endorsementKey() (*attest.EK, error) {
	if t.ek != nil {
		return t.ek, nil
	}
	eks, err := t.at.EKs()
	if err != nil {
		return nil, fmt.Errorf("attestor: read EK: %w", err)
	}
	for i := range eks {
		if _, ok := eks[i].Public.(*rsa.PublicKey); ok {
			t.ek = &eks[i]
			return t.ek, nil
		}
	}
	return nil, errors.New("attestor: read EK: the TPM has no RSA EK")
}

// ekSHA256 is the EK fingerprint policy pins: hex SHA-256 of the PKIX DER.
func ekSHA256(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// Evidence is what the agent sends the signer to be attested: all public.
type Evidence struct {
	EKCertificate []byte                         // DER, nil when the TPM has none
	EKPublic      []byte                         // PKIX DER of the EK
	AK            attest.AttestationParameters   // the AK and its creation attestation
	Key           attest.CertificationParameters // the signing key, certified by the AK
	CSR           []byte                         // DER, signed by the certified key
}

// Session is one attestation: an AK and an ECDSA P-256 signing key certified
// by it, both created in the TPM. Activate uses the AK once and forgets it;
// the key signs until Close, as the agent's TLS client key. A renewal opens a
// new session while the old one still signs, then closes the old one.
//
// Between operations a session holds no TPM object slot: it keeps its AK and
// key as blobs wrapped by the storage root key, and each operation loads
// what it needs and flushes it before returning. swtpm and the reference TPM
// hold three transient objects, and creating or loading under the persistent
// SRK takes two of them; a renewal with the old key left loaded runs out of
// object memory.
type Session struct {
	tpm      *TPM
	akBlob   []byte // nil once activated or closed
	keyBlob  []byte // nil once closed
	pub      *ecdsa.PublicKey
	evidence *Evidence
}

// NewSession creates an AK and a signing key certified by it, and signs the
// CSR of the evidence with that key.
func (t *TPM) NewSession() (*Session, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrTPMClosed
	}
	// Read the EK before creating anything: without a certificate, reading it
	// takes an object slot for a moment.
	ek, err := t.endorsementKey()
	if err != nil {
		return nil, err
	}
	ak, err := t.at.NewAK(&attest.AKConfig{Algorithm: akAlgorithm})
	if err != nil {
		return nil, fmt.Errorf("attestor: create AK: %w", err)
	}
	s, err := t.newSession(ek, ak)
	if ferr := ak.Close(t.at); ferr != nil {
		return nil, errors.Join(err, fmt.Errorf("attestor: flush AK: %w", ferr))
	}
	return s, err
}

// newSession creates the signing key under the loaded AK and gathers the
// evidence. The caller holds t.mu and flushes the AK.
func (t *TPM) newSession(ek *attest.EK, ak *attest.AK) (*Session, error) {
	key, err := t.at.NewKey(ak, &attest.KeyConfig{Algorithm: attest.ECDSA, Size: 256})
	if err != nil {
		return nil, fmt.Errorf("attestor: create signing key: %w", err)
	}
	s, err := buildSession(t, ek, ak, key)
	if ferr := key.Close(); ferr != nil {
		return nil, errors.Join(err, fmt.Errorf("attestor: flush signing key: %w", ferr))
	}
	return s, err
}

// buildSession wraps the loaded AK and key into a Session and its evidence.
func buildSession(t *TPM, ek *attest.EK, ak *attest.AK, key *attest.Key) (*Session, error) {
	akBlob, err := ak.Marshal()
	if err != nil {
		return nil, fmt.Errorf("attestor: save AK: %w", err)
	}
	keyBlob, err := key.Marshal()
	if err != nil {
		return nil, fmt.Errorf("attestor: save signing key: %w", err)
	}
	signer, pub, err := keySigner(key)
	if err != nil {
		return nil, err
	}
	ekDER, err := x509.MarshalPKIXPublicKey(ek.Public)
	if err != nil {
		return nil, fmt.Errorf("attestor: encode EK: %w", err)
	}
	// The CSR only proves possession of the key: the signer takes the
	// identity from the EK, never from the CSR, so it needs no subject.
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer)
	if err != nil {
		return nil, fmt.Errorf("attestor: sign CSR: %w", err)
	}
	ev := &Evidence{
		EKPublic: ekDER,
		AK:       ak.AttestationParameters(),
		Key:      key.CertificationParameters(),
		CSR:      csr,
	}
	if ek.Certificate != nil {
		ev.EKCertificate = ek.Certificate.Raw
	}
	return &Session{tpm: t, akBlob: akBlob, keyBlob: keyBlob, pub: pub, evidence: ev}, nil
}

// keySigner returns the TPM-backed crypto.Signer of a loaded ECDSA key.
func keySigner(key *attest.Key) (crypto.Signer, *ecdsa.PublicKey, error) {
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok {
		return nil, nil, fmt.Errorf("attestor: signing key is %T, want ECDSA", key.Public())
	}
	priv, err := key.Private(pub)
	if err != nil {
		return nil, nil, fmt.Errorf("attestor: signing key: %w", err)
	}
	signer, ok := priv.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("attestor: signing key: %T is not a crypto.Signer", priv)
	}
	return signer, pub, nil
}

// Evidence returns what the signer needs to attest this session. It fails
// once the session is activated or closed: its AK is gone, so nobody could
// answer a challenge for it.
func (s *Session) Evidence() (*Evidence, error) {
	t := s.tpm
	t.mu.Lock()
	defer t.mu.Unlock()
	if s.akBlob == nil {
		return nil, errors.New("attestor: evidence: session already activated or closed")
	}
	ev := *s.evidence
	// The caller may edit what it gets; the session's copy stays intact.
	ev.EKCertificate, ev.EKPublic, ev.CSR = bytes.Clone(ev.EKCertificate), bytes.Clone(ev.EKPublic), bytes.Clone(ev.CSR)
	for _, b := range []*[]byte{
		&ev.AK.Public, &ev.AK.CreateData, &ev.AK.CreateAttestation, &ev.AK.CreateSignature,
		&ev.Key.Public, &ev.Key.CreateData, &ev.Key.CreateAttestation, &ev.Key.CreateSignature,
	} {
		*b = bytes.Clone(*b)
	}
	return &ev, nil
}

// Activate answers the signer's credential activation challenge, proving the
// AK lives in the TPM that holds the EK. A session activates once, right or
// wrong: the AK is flushed and forgotten whatever the outcome.
func (s *Session) Activate(ec attest.EncryptedCredential) ([]byte, error) {
	t := s.tpm
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrTPMClosed
	}
	if s.akBlob == nil {
		return nil, errors.New("attestor: activate: session already activated or closed")
	}
	blob := s.akBlob
	s.akBlob = nil
	ak, err := t.at.LoadAK(blob)
	if err != nil {
		return nil, fmt.Errorf("attestor: load AK: %w", err)
	}
	secret, err := ak.ActivateCredential(t.at, ec)
	if ferr := ak.Close(t.at); ferr != nil {
		return nil, errors.Join(err, fmt.Errorf("attestor: flush AK: %w", ferr))
	}
	if err != nil {
		return nil, fmt.Errorf("attestor: activate credential: %w", err)
	}
	return secret, nil
}

// Signer returns the TPM-resident signing key (Public is an
// *ecdsa.PublicKey), for the agent's TLS client certificate. Each Sign takes
// the TPM mutex and loads the key for the one signature; after Close it
// fails.
func (s *Session) Signer() crypto.Signer {
	return sessionSigner{s: s}
}

// sessionSigner serializes Sign with every other TPM command.
type sessionSigner struct{ s *Session }

func (ss sessionSigner) Public() crypto.PublicKey { return ss.s.pub }

func (ss sessionSigner) Sign(rnd io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	s, t := ss.s, ss.s.tpm
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrTPMClosed
	}
	if s.keyBlob == nil {
		return nil, errors.New("attestor: sign: session closed")
	}
	key, err := t.at.LoadKey(s.keyBlob)
	if err != nil {
		return nil, fmt.Errorf("attestor: load signing key: %w", err)
	}
	sig, err := signWith(key, rnd, digest, opts)
	if ferr := key.Close(); ferr != nil {
		return nil, errors.Join(err, fmt.Errorf("attestor: flush signing key: %w", ferr))
	}
	return sig, err
}

// signWith signs with a loaded key.
func signWith(key *attest.Key, rnd io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	signer, _, err := keySigner(key)
	if err != nil {
		return nil, err
	}
	sig, err := signer.Sign(rnd, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("attestor: sign in TPM: %w", err)
	}
	return sig, nil
}

// Close ends the session: its AK and key can no longer be used. Nothing is
// loaded in the TPM between operations, so there is nothing to flush;
// closing twice is harmless.
func (s *Session) Close() error {
	t := s.tpm
	t.mu.Lock()
	defer t.mu.Unlock()
	s.akBlob, s.keyBlob = nil, nil
	return nil
}

// WithChannel runs fn with the TPM's raw command stream, holding the TPM
// for fn's duration so no other command interleaves. It is the door for
// TPM uses beyond attestation (the signer seals its key-encryption key
// with it); fn must flush every object it loads.
func (t *TPM) WithChannel(fn func(rw io.ReadWriter) error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return errors.New("attestor: TPM is closed")
	}
	return fn(t.ch)
}

//go:build cgo

// The go-tpm-tools simulator needs cgo. It is a process-wide singleton:
// simulator.Get blocks until the previous one is closed, so these tests never
// run in parallel and always close their TPM.

package node

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"io"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// nvEKCertIndex is where TPMs keep the RSA EK certificate.
const nvEKCertIndex = tpmutil.Handle(0x01c00002)

// simEKCert issues an EK certificate for a fresh simulator; nil leaves the
// simulator without one.
type simEKCert func(t *testing.T, ek crypto.PublicKey) []byte

// openSimTPM starts a fresh simulator (new seeds, so a new EK), writes an EK
// certificate to its NV when cert is set, and opens it through
// OpenTPMChannel. The TPM, and with it the simulator, closes at cleanup.
func openSimTPM(t *testing.T, cert simEKCert) *TPM {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("start simulator: %v", err)
	}
	if cert != nil {
		if err := writeEKCert(sim, cert(t, simEKPublic(t, sim))); err != nil {
			sim.Close()
			t.Fatalf("provision EK certificate: %v", err)
		}
	}
	tpm, err := OpenTPMChannel(sim)
	if err != nil {
		sim.Close()
		t.Fatalf("OpenTPMChannel: %v", err)
	}
	t.Cleanup(func() {
		if err := tpm.Close(); err != nil {
			t.Errorf("close TPM: %v", err)
		}
	})
	return tpm
}

// bareChannel lets go-attestation use the simulator without closing it.
type bareChannel struct{ io.ReadWriter }

func (bareChannel) Close() error                    { return nil }
func (bareChannel) MeasurementLog() ([]byte, error) { return nil, errNoEventLog }

// simEKPublic returns the simulator's RSA EK, as go-attestation derives it.
func simEKPublic(t *testing.T, sim io.ReadWriter) crypto.PublicKey {
	t.Helper()
	at, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: bareChannel{sim}})
	if err != nil {
		t.Fatal(err)
	}
	defer at.Close()
	eks, err := at.EKs()
	if err != nil || len(eks) == 0 {
		t.Fatalf("read simulator EK: %v %v", eks, err)
	}
	return eks[0].Public
}

// writeEKCert stores der where TPMs keep the RSA EK certificate, in chunks
// no larger than the TPM's NV buffer.
func writeEKCert(sim io.ReadWriter, der []byte) error {
	attrs := tpm2.AttrOwnerWrite | tpm2.AttrOwnerRead | tpm2.AttrAuthRead | tpm2.AttrNoDA
	if err := tpm2.NVDefineSpace(sim, tpm2.HandleOwner, nvEKCertIndex, "", "", nil, attrs, uint16(len(der))); err != nil {
		return err
	}
	const chunk = 1024
	for off := 0; off < len(der); off += chunk {
		end := min(off+chunk, len(der))
		if err := tpm2.NVWrite(sim, tpm2.HandleOwner, nvEKCertIndex, "", der[off:end], uint16(off)); err != nil {
			return err
		}
	}
	return nil
}

// attestSim runs one whole attestation of sess against rules.
func attestSim(t *testing.T, sess *Session, rules []Rule) (*Node, error) {
	t.Helper()
	ev, err := sess.Evidence()
	if err != nil {
		t.Fatalf("Evidence: %v", err)
	}
	ch, err := NewChallenge(ev, rules, nil, time.Now())
	if err != nil {
		return nil, err
	}
	answer, err := sess.Activate(ch.Credential())
	if err != nil {
		t.Fatalf("Activate: %v", err)
	}
	return ch.Verify(answer)
}

func newSimSession(t *testing.T, tpm *TPM) *Session {
	t.Helper()
	sess, err := tpm.NewSession()
	if err != nil {
		t.Fatalf("NewSession: %v", err)
	}
	t.Cleanup(func() { sess.Close() })
	return sess
}

func mustInfo(t *testing.T, tpm *TPM) *Info {
	t.Helper()
	info, err := tpm.Info()
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	return info
}

func TestTPMAttestation(t *testing.T) {
	root := newEKTestRoot(t, "EK Root")
	inter := root.intermediate(t, "EK Intermediate")
	other := newEKTestRoot(t, "Other Root")
	byInter := func(t *testing.T, ek crypto.PublicKey) []byte { return inter.issueEK(t, ek, time.Now().Add(time.Hour)) }
	byOther := func(t *testing.T, ek crypto.PublicKey) []byte { return other.issueEK(t, ek, time.Now().Add(time.Hour)) }
	viaCA := Rule{Name: "fleet", Roots: root.pool(), Intermediates: inter.pool()}
	pin := func(info *Info) Rule { return Rule{Name: "lab", EKSHA256: []string{info.EKSHA256}} }
	flipLast := func(b []byte) []byte { b = bytes.Clone(b); b[len(b)-1] ^= 1; return b }

	tests := []struct {
		name   string
		cert   simEKCert
		rules  func(info *Info) []Rule
		tamper func(t *testing.T, ev *Evidence)
		answer func(answer []byte) []byte
		want   error
		// wantNode lists what an accepted node holds, CSR aside.
		wantNode func(info *Info) *Node
	}{
		{
			name:  "pinned",
			rules: func(info *Info) []Rule { return []Rule{pin(info)} },
			wantNode: func(info *Info) *Node {
				return &Node{EKSHA256: info.EKSHA256, Names: []string{"lab"}}
			},
		},
		{
			name:  "ek_ca through the intermediate",
			cert:  byInter,
			rules: func(*Info) []Rule { return []Rule{viaCA} },
			wantNode: func(info *Info) *Node {
				return &Node{EKSHA256: info.EKSHA256, Names: []string{"fleet"}, Manufacturer: testEKManufacturer,
					Model: testEKModel, Version: testEKVersion, EKCertificate: info.EKCertificate}
			},
		},
		{
			name:  "pinned and chained",
			cert:  byInter,
			rules: func(info *Info) []Rule { return []Rule{viaCA, pin(info)} },
			wantNode: func(info *Info) *Node {
				return &Node{EKSHA256: info.EKSHA256, Names: []string{"fleet", "lab"}, Manufacturer: testEKManufacturer,
					Model: testEKModel, Version: testEKVersion, EKCertificate: info.EKCertificate}
			},
		},
		{
			// Nobody vouched for the certificate, so its attributes are not used.
			name:  "pinned, certificate chains nowhere",
			cert:  byOther,
			rules: func(info *Info) []Rule { return []Rule{viaCA, pin(info)} },
			wantNode: func(info *Info) *Node {
				return &Node{EKSHA256: info.EKSHA256, Names: []string{"lab"}, EKCertificate: info.EKCertificate}
			},
		},
		{
			name: "neither pinned nor chained",
			rules: func(*Info) []Rule {
				return []Rule{{Name: "lab", EKSHA256: []string{hex.EncodeToString(make([]byte, 32))}}}
			},
			want: ErrUnknownEK,
		},
		{
			name:  "certificate from another CA",
			cert:  byOther,
			rules: func(*Info) []Rule { return []Rule{viaCA} },
			want:  ErrEKCertUntrusted,
		},
		{
			name:  "no certificate, only ek_ca rules",
			rules: func(*Info) []Rule { return []Rule{viaCA} },
			want:  ErrEKCertMissing,
		},
		{
			name:   "wrong activation answer",
			rules:  func(info *Info) []Rule { return []Rule{pin(info)} },
			answer: flipLast,
			want:   ErrActivationMismatch,
		},
		{
			name:  "CSR for a key the AK did not certify",
			rules: func(info *Info) []Rule { return []Rule{pin(info)} },
			tamper: func(t *testing.T, ev *Evidence) {
				key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				if ev.CSR, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key); err != nil {
					t.Fatal(err)
				}
			},
			want: ErrCSRKeyMismatch,
		},
		{
			name:   "key certification tampered",
			rules:  func(info *Info) []Rule { return []Rule{pin(info)} },
			tamper: func(t *testing.T, ev *Evidence) { ev.Key.CreateSignature = flipLast(ev.Key.CreateSignature) },
			want:   ErrKeyNotCertified,
		},
		{
			name:   "AK creation attestation tampered",
			rules:  func(info *Info) []Rule { return []Rule{pin(info)} },
			tamper: func(t *testing.T, ev *Evidence) { ev.AK.CreateSignature = flipLast(ev.AK.CreateSignature) },
			want:   ErrAKInvalid,
		},
		{
			name:  "EK public key of another TPM",
			cert:  byInter,
			rules: func(*Info) []Rule { return []Rule{viaCA} },
			tamper: func(t *testing.T, ev *Evidence) {
				ev.EKPublic = newSoftwareEvidence(t).evidence(t, nil).EKPublic
			},
			want: ErrMalformedEvidence,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tpm := openSimTPM(t, tc.cert)
			info := mustInfo(t, tpm)
			sess := newSimSession(t, tpm)
			ev, err := sess.Evidence()
			if err != nil {
				t.Fatalf("Evidence: %v", err)
			}
			if tc.tamper != nil {
				tc.tamper(t, ev)
			}
			ch, err := NewChallenge(ev, tc.rules(info), nil, time.Now())
			if err == nil {
				answer, aerr := sess.Activate(ch.Credential())
				if aerr != nil {
					t.Fatalf("Activate: %v", aerr)
				}
				if tc.answer != nil {
					answer = tc.answer(answer)
				}
				var got *Node
				if got, err = ch.Verify(answer); err == nil {
					checkNode(t, got, tc.wantNode(info), sess)
				}
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("attestation error = %v, want %v", err, tc.want)
			}
		})
	}
}

// checkNode compares an accepted node with want, and checks its CSR is the
// session's key.
func checkNode(t *testing.T, got, want *Node, sess *Session) {
	t.Helper()
	if got.CSR == nil || !sess.Signer().Public().(*ecdsa.PublicKey).Equal(got.CSR.PublicKey) {
		t.Errorf("node CSR is not for the session's key")
	}
	gotNoCSR := *got
	gotNoCSR.CSR = nil
	if diff := cmp.Diff(want, &gotNoCSR); diff != "" {
		t.Errorf("node mismatch (-want +got):\n%s", diff)
	}
}

func TestTPMReplayedAnswer(t *testing.T) {
	tpm := openSimTPM(t, nil)
	rules := []Rule{{Name: "lab", EKSHA256: []string{mustInfo(t, tpm).EKSHA256}}}

	first := newSimSession(t, tpm)
	ev1, err := first.Evidence()
	if err != nil {
		t.Fatal(err)
	}
	ch1, err := NewChallenge(ev1, rules, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	answer1, err := first.Activate(ch1.Credential())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch1.Verify(answer1); err != nil {
		t.Fatalf("first answer: %v", err)
	}

	t.Run("same answer to the same challenge", func(t *testing.T) {
		if _, err := ch1.Verify(answer1); !errors.Is(err, ErrChallengeUsed) {
			t.Fatalf("Verify() error = %v, want ErrChallengeUsed", err)
		}
	})
	t.Run("old answer to a new challenge for the recorded evidence", func(t *testing.T) {
		ch, err := NewChallenge(ev1, rules, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ch.Verify(answer1); !errors.Is(err, ErrActivationMismatch) {
			t.Fatalf("Verify() error = %v, want ErrActivationMismatch", err)
		}
	})
	t.Run("old answer to a new session's challenge", func(t *testing.T) {
		second := newSimSession(t, tpm)
		ev2, err := second.Evidence()
		if err != nil {
			t.Fatal(err)
		}
		ch2, err := NewChallenge(ev2, rules, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ch2.Verify(answer1); !errors.Is(err, ErrActivationMismatch) {
			t.Fatalf("Verify() error = %v, want ErrActivationMismatch", err)
		}
	})
	t.Run("key certification from another session", func(t *testing.T) {
		third := newSimSession(t, tpm)
		ev3, err := third.Evidence()
		if err != nil {
			t.Fatal(err)
		}
		ev3.Key, ev3.CSR = ev1.Key, ev1.CSR
		if _, err := NewChallenge(ev3, rules, nil, time.Now()); !errors.Is(err, ErrKeyNotCertified) {
			t.Fatalf("NewChallenge() error = %v, want ErrKeyNotCertified", err)
		}
	})
}

func TestTPMInfo(t *testing.T) {
	root := newEKTestRoot(t, "EK Root")
	tests := []struct {
		name     string
		cert     simEKCert
		wantCert []string // CertManufacturer, CertModel, CertVersion
	}{
		{"no EK certificate", nil, []string{"", "", ""}},
		{"EK certificate", func(t *testing.T, ek crypto.PublicKey) []byte { return root.issueEK(t, ek, time.Now().Add(time.Hour)) },
			[]string{testEKManufacturer, testEKModel, testEKVersion}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tpm := openSimTPM(t, tc.cert)
			info := mustInfo(t, tpm)
			t.Logf("EK %s, manufacturer %q, firmware %s", info.EKSHA256, info.Manufacturer, info.FirmwareVersion)
			sess := newSimSession(t, tpm)
			ev, err := sess.Evidence()
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(ev.EKPublic)
			if info.EKSHA256 != hex.EncodeToString(sum[:]) {
				t.Errorf("EKSHA256 = %s, want the SHA-256 of the evidence's EK %x", info.EKSHA256, sum)
			}
			if info.Manufacturer == "" || !regexp.MustCompile(`^\d+\.\d+$`).MatchString(info.FirmwareVersion) {
				t.Errorf("Manufacturer %q, FirmwareVersion %q: want a name and major.minor", info.Manufacturer, info.FirmwareVersion)
			}
			if (info.EKCertificate != nil) != (tc.cert != nil) || (tc.cert != nil && !bytes.Equal(info.EKCertificate.Raw, ev.EKCertificate)) {
				t.Errorf("EKCertificate = %v, evidence carries %d bytes; want the TPM's certificate in both", info.EKCertificate, len(ev.EKCertificate))
			}
			got := []string{info.CertManufacturer, info.CertModel, info.CertVersion}
			if diff := cmp.Diff(tc.wantCert, got); diff != "" {
				t.Errorf("certificate attributes mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestTPMSignerSigns(t *testing.T) {
	tpm := openSimTPM(t, nil)
	sess := newSimSession(t, tpm)
	signer := sess.Signer()
	pub, ok := signer.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("Public() = %T, want a P-256 *ecdsa.PublicKey", signer.Public())
	}
	// TLS signs from many goroutines; the TPM mutex keeps commands apart.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			digest := sha256.Sum256([]byte{byte(i)})
			sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
			if err != nil {
				errs <- err
				return
			}
			if !ecdsa.VerifyASN1(pub, digest[:], sig) {
				errs <- errors.New("signature does not verify")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestTPMCloseIsIdempotent(t *testing.T) {
	tpm := openSimTPM(t, nil)
	sess := newSimSession(t, tpm)
	signer := sess.Signer()
	for i := range 2 {
		if err := sess.Close(); err != nil {
			t.Fatalf("Session.Close #%d: %v", i+1, err)
		}
	}
	digest := sha256.Sum256([]byte("x"))
	if _, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256); err == nil {
		t.Error("Sign after Session.Close succeeded")
	}
	if _, err := sess.Activate(attest.EncryptedCredential{}); err == nil {
		t.Error("Activate after Session.Close succeeded")
	}
	if _, err := sess.Evidence(); err == nil {
		t.Error("Evidence after Session.Close succeeded")
	}

	open := newSimSession(t, tpm)
	for i := range 2 {
		if err := tpm.Close(); err != nil {
			t.Fatalf("TPM.Close #%d: %v", i+1, err)
		}
	}
	if err := open.Close(); err != nil {
		t.Errorf("Session.Close after TPM.Close: %v", err)
	}
	if _, err := tpm.NewSession(); !errors.Is(err, ErrTPMClosed) {
		t.Errorf("NewSession after TPM.Close: %v, want ErrTPMClosed", err)
	}
	if _, err := open.Signer().Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, ErrTPMClosed) {
		t.Errorf("Sign after TPM.Close: %v, want ErrTPMClosed", err)
	}
}

func TestTPMRenewal(t *testing.T) {
	tpm := openSimTPM(t, nil)
	rules := []Rule{{Name: "lab", EKSHA256: []string{mustInfo(t, tpm).EKSHA256}}}
	digest := sha256.Sum256([]byte("renewal"))

	old := newSimSession(t, tpm)
	if _, err := attestSim(t, old, rules); err != nil {
		t.Fatalf("first attestation: %v", err)
	}
	// Several rounds: a slot leak would show by the third.
	for round := range 3 {
		next, err := tpm.NewSession()
		if err != nil {
			t.Fatalf("round %d: NewSession with the old key loaded: %v", round, err)
		}
		if _, err := attestSim(t, next, rules); err != nil {
			t.Fatalf("round %d: attestation: %v", round, err)
		}
		// The old key keeps serving TLS until the new SVID is in place.
		if _, err := old.Signer().Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
			t.Fatalf("round %d: old key: %v", round, err)
		}
		if err := old.Close(); err != nil {
			t.Fatalf("round %d: close old session: %v", round, err)
		}
		sig, err := next.Signer().Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil || !ecdsa.VerifyASN1(next.Signer().Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatalf("round %d: new key: %v", round, err)
		}
		old = next
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
}

// failingReader is a randomness source that has run dry.
type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, io.ErrUnexpectedEOF }

func TestNewChallengeRandomnessFailureIsNoRefusal(t *testing.T) {
	tpm := openSimTPM(t, nil)
	rules := []Rule{{Name: "lab", EKSHA256: []string{mustInfo(t, tpm).EKSHA256}}}
	ev, err := newSimSession(t, tpm).Evidence()
	if err != nil {
		t.Fatal(err)
	}
	// go-attestation wraps the reader's error with %v, so only the text is left.
	_, err = NewChallenge(ev, rules, failingReader{}, time.Now())
	if err == nil || !strings.Contains(err.Error(), io.ErrUnexpectedEOF.Error()) {
		t.Fatalf("NewChallenge() error = %v, want the reader's error", err)
	}
	for _, refusal := range []error{ErrMalformedEvidence, ErrUnknownEK, ErrEKCertMissing, ErrEKCertUntrusted,
		ErrAKInvalid, ErrKeyNotCertified, ErrCSRKeyMismatch, ErrActivationMismatch, ErrChallengeUsed} {
		if errors.Is(err, refusal) {
			t.Errorf("NewChallenge() error = %v: our randomness failing is no refusal of the TPM", err)
		}
	}
}

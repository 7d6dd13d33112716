//go:build cgo

// The go-tpm-tools simulator is a process-wide singleton (simulator.Get
// blocks until the previous one is closed): these tests never run in
// parallel. A fixed seed stands for one TPM; another seed for another.

package signer

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
)

// simTPM is one simulated TPM, kept across signer "restarts": the signer
// closes what it opens, which must not power the TPM off.
type simTPM struct{ sim *simulator.Simulator }

type noClose struct{ io.ReadWriter }

func (noClose) Close() error { return nil }

func newSimTPM(t *testing.T, seed int64) *simTPM {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatalf("start simulator: %v", err)
	}
	st := &simTPM{sim: sim}
	t.Cleanup(func() { st.close() })
	return st
}

func (st *simTPM) close() {
	if !st.sim.IsClosed() {
		st.sim.Close()
	}
}

func (st *simTPM) open() (*node.TPM, error) { return node.OpenTPMChannel(noClose{st.sim}) }

// newSealedSigner is a signer with key_storage "tpm" on st.
func newSealedSigner(t *testing.T, dir string, st *simTPM) (*Signer, error) {
	t.Helper()
	cfg := testConfig(t, dir, "tpm { socket = \"/unused\" }\n")
	if cfg.KeyStorage != KeyStorageTPM {
		t.Fatalf("key_storage = %q with a tpm block, want tpm", cfg.KeyStorage)
	}
	return newSigner(cfg, hclog.NewNullLogger(), st.open)
}

func mustSealedSigner(t *testing.T, dir string, st *simTPM) *Signer {
	t.Helper()
	s, err := newSealedSigner(t, dir, st)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := s.publish(s.auth.publication()); err != nil {
		t.Fatal(err)
	}
	return s
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// snapshotDir returns every file in dir by name.
func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := make(map[string]string)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		out[e.Name()] = string(readFile(t, filepath.Join(dir, e.Name())))
	}
	return out
}

func TestSealedKeysSurviveRestarts(t *testing.T) {
	tpm := newSimTPM(t, 7)
	dir := t.TempDir()
	s1 := mustSealedSigner(t, dir, tpm)
	ca := s1.auth.active.Cert
	bundle := readFile(t, s1.cfg.BundlePath)
	jwks := readFile(t, filepath.Join(s1.cfg.StateDir, JWTStateFile))
	for _, f := range []string{SealedKeyFile, SigningKeysFile} {
		fi, err := os.Stat(filepath.Join(s1.cfg.StateDir, f))
		if err != nil {
			t.Fatalf("first start did not write %s: %v", f, err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	// Neither file holds a key in usable form.
	for _, f := range []string{SealedKeyFile, SigningKeysFile} {
		if data := readFile(t, filepath.Join(s1.cfg.StateDir, f)); bytes.Contains(data, []byte("PRIVATE KEY")) {
			t.Errorf("%s holds a PEM private key", f)
		}
	}
	for i := range 20 {
		s := mustSealedSigner(t, dir, tpm)
		if got := readFile(t, s.cfg.BundlePath); !bytes.Equal(got, bundle) {
			t.Fatalf("restart %d: bundle changed:\n%s\nwant\n%s", i+1, got, bundle)
		}
		if got := readFile(t, filepath.Join(s.cfg.StateDir, JWTStateFile)); !bytes.Equal(got, jwks) {
			t.Fatalf("restart %d: JWT keys changed", i+1)
		}
		if c := sign(t, s, time.Hour, time.Now()); !signedBy(c, ca) {
			t.Fatalf("restart %d: signs with another CA", i+1)
		}
		if s.auth.activeJWT.kid != s1.auth.activeJWT.kid {
			t.Fatalf("restart %d: JWT key %s, want %s", i+1, s.auth.activeJWT.kid, s1.auth.activeJWT.kid)
		}
	}
}

func TestSealedKeysRestoreSchedule(t *testing.T) {
	// A prepared successor is restored with its key and takes over when
	// its time comes, as without the restart.
	tpm := newSimTPM(t, 8)
	dir := t.TempDir()
	s1 := mustSealedSigner(t, dir, tpm)
	t0 := issued(s1.auth.active)
	if _, err := s1.advanceCAs(t0.Add(21 * time.Hour / 2)); err != nil { // past prepare (ca_ttl/2 - lead)
		t.Fatal(err)
	}
	if s1.auth.next == nil {
		t.Fatal("no successor prepared")
	}
	next := s1.auth.next.Cert
	bundle := readFile(t, s1.cfg.BundlePath)
	s2 := mustSealedSigner(t, dir, tpm)
	if got := readFile(t, s2.cfg.BundlePath); !bytes.Equal(got, bundle) {
		t.Fatal("bundle changed across the restart")
	}
	if s2.auth.next == nil || !s2.auth.next.Cert.Equal(next) {
		t.Fatal("successor not restored with its key")
	}
	if c := sign(t, s2, time.Hour, t0.Add(13*time.Hour)); !signedBy(c, next) {
		t.Error("restored successor does not take over on schedule")
	}
}

func TestSealedKeysRefused(t *testing.T) {
	rewrite := func(t *testing.T, state string, edit func(*signingKeysDoc)) {
		path := filepath.Join(state, SigningKeysFile)
		var doc signingKeysDoc
		if err := json.Unmarshal(readFile(t, path), &doc); err != nil {
			t.Fatal(err)
		}
		edit(&doc)
		b, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name   string
		spoil  func(t *testing.T, s *Signer, tpm *simTPM) // after a first start on TPM seed 9
		seed   int64                                      // the TPM of the second start
		reason string
	}{
		{"another TPM", func(*testing.T, *Signer, *simTPM) {}, 10, SealedKeyFile + ": this TPM cannot unseal it"},
		{"sealed key missing", func(t *testing.T, s *Signer, _ *simTPM) {
			if err := os.Remove(filepath.Join(s.cfg.StateDir, SealedKeyFile)); err != nil {
				t.Fatal(err)
			}
		}, 9, SealedKeyFile + ": missing, but signing-keys.json holds encrypted keys"},
		{"tampered ciphertext", func(t *testing.T, s *Signer, _ *simTPM) {
			rewrite(t, s.cfg.StateDir, func(d *signingKeysDoc) { d.Generations[0].CAKey.Ciphertext[3] ^= 1 })
		}, 9, "generation 1: CA key (serial"},
		{"another key's ciphertext", func(t *testing.T, s *Signer, _ *simTPM) {
			// Decrypts only with its own ID as associated data.
			rewrite(t, s.cfg.StateDir, func(d *signingKeysDoc) { d.Generations[0].CAKey = d.Generations[0].JWTKey })
		}, 9, "does not decrypt with this TPM's key"},
		{"key does not match its certificate", func(t *testing.T, s *Signer, tpm *simTPM) {
			other, err := NewCA(testTD, time.Hour, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			ks := openTestKeyStore(t, tpm, s.cfg.StateDir)
			// The active certificate with another CA's key.
			swapped := &CA{td: testTD, key: other.key, Cert: s.auth.active.Cert}
			if err := ks.save(swapped, s.auth.activeJWT, nil, nil); err != nil {
				t.Fatal(err)
			}
		}, 9, "does not match its certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			first := newSimTPM(t, 9)
			s := mustSealedSigner(t, dir, first)
			tt.spoil(t, s, first)
			first.close()
			before := snapshotDir(t, s.cfg.StateDir)
			bundle := readFile(t, s.cfg.BundlePath)

			_, err := newSealedSigner(t, dir, newSimTPM(t, tt.seed))
			if !errors.Is(err, ErrKeyStorage) || !strings.Contains(err.Error(), tt.reason) {
				t.Fatalf("New = %v, want ErrKeyStorage with %q", err, tt.reason)
			}
			if !strings.Contains(err.Error(), s.cfg.StateDir) && !strings.Contains(err.Error(), SigningKeysFile) {
				t.Errorf("error %q names no file", err)
			}
			if diff := cmp.Diff(before, snapshotDir(t, s.cfg.StateDir)); diff != "" {
				t.Errorf("state_dir changed by a refused start (-before +after):\n%s", diff)
			}
			if !bytes.Equal(bundle, readFile(t, s.cfg.BundlePath)) {
				t.Error("bundle changed by a refused start")
			}
		})
	}
}

func TestSealedKeysFirstStartCreates(t *testing.T) {
	// An empty state dir: a fresh CA, its key sealed before publication.
	tpm := newSimTPM(t, 11)
	dir := t.TempDir()
	s, err := newSealedSigner(t, dir, tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.cfg.StateDir, SealedKeyFile)); err != nil {
		t.Fatalf("sealed key not written at start: %v", err)
	}
	if err := s.publish(s.auth.publication()); err != nil {
		t.Fatal(err)
	}
	ks := openTestKeyStore(t, tpm, s.cfg.StateDir)
	gens, err := ks.load()
	if err != nil {
		t.Fatal(err)
	}
	if len(gens) != 1 || gens[0].role != roleActive || gens[0].caSerial != serialHex(s.auth.active.Cert) || !gens[0].caKey.Equal(s.auth.active.key) {
		t.Fatalf("stored generations = %+v, want the active CA's", gens)
	}
}

// openTestKeyStore opens dir's key store with tpm, as a signer start does.
func openTestKeyStore(t *testing.T, tpm *simTPM, dir string) *keyStore {
	t.Helper()
	h, err := tpm.open()
	if err != nil {
		t.Fatal(err)
	}
	ks, err := openKeyStore(dir, h)
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

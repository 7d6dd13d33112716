package signer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	testTD = spiffeid.RequireTrustDomainFromString("example.org")
	testID = spiffeid.RequireFromString("spiffe://example.org/w")
)

// testConfig writes a policy to dir and returns a config with extra
// lines, bundle_path out/bundle.pem and state_dir state/ under dir, and no
// admin socket unless extra names one.
func testConfig(t *testing.T, dir, extra string) *Config {
	t.Helper()
	pol := "node \"lab\" {\n  ek_sha256 = [\"" + strings.Repeat("ab", 32) + "\"]\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "policy.hcl"), []byte(pol), 0o600); err != nil {
		t.Fatal(err)
	}
	src := "trust_domain = \"example.org\"\npolicy_path = \"policy.hcl\"\nbundle_path = \"out/bundle.pem\"\nstate_dir = \"state\"\n" + extra
	cfg, err := ParseConfig([]byte(src), filepath.Join(dir, "signer.hcl"))
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	if !strings.Contains(extra, "admin_socket_path") {
		cfg.AdminSocketPath = ""
	}
	return cfg
}

// newTestSigner makes a signer from testConfig.
func newTestSigner(t *testing.T, dir, extra string) *Signer {
	t.Helper()
	s, err := New(testConfig(t, dir, extra), hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

func newPub(t *testing.T) crypto.PublicKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k.Public()
}

// sign issues an SVID as the API does: through the authority, under the lock.
func sign(t *testing.T, s *Signer, ttl time.Duration, now time.Time) *x509.Certificate {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.auth.sign(newPub(t), testID, ttl, nil, now)
	if err != nil {
		t.Fatalf("sign at %v: %v", now, err)
	}
	return c
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func signedBy(c *x509.Certificate, ca *x509.Certificate) bool {
	return bytes.Equal(c.AuthorityKeyId, ca.SubjectKeyId) && c.CheckSignatureFrom(ca) == nil
}

// readCerts reads a PEM file and fails on anything but certificates.
func readCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var certs []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			t.Fatalf("%s holds a %q block", path, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(data)) > 0 {
		t.Fatalf("%s holds data that is not PEM", path)
	}
	return certs
}

// serials names certs, sorted: a hand-over changes the order of the
// bundle, not its content, and is not a bundle change.
func serials(certs []*x509.Certificate) []string {
	var out []string
	for _, c := range certs {
		out = append(out, serialHex(c))
	}
	slices.Sort(out)
	return out
}

// checkPublished asserts that the bundle, bundle_path and the CA state
// all hold exactly want.
func checkPublished(t *testing.T, s *Signer, want ...*x509.Certificate) {
	t.Helper()
	w := strings.Join(serials(want), ",")
	if got := strings.Join(serials(s.bundle.X509Authorities()), ","); got != w {
		t.Errorf("bundle = %s, want %s", got, w)
	}
	for _, path := range []string{s.cfg.BundlePath, filepath.Join(s.cfg.StateDir, CAStateFile)} {
		if got := strings.Join(serials(readCerts(t, path)), ","); got != w {
			t.Errorf("%s = %s, want %s", filepath.Base(path), got, w)
		}
	}
}

func TestCARotationOverlap(t *testing.T) {
	s := newTestSigner(t, t.TempDir(), "") // ca_ttl 24h, ca_publish_lead 4h
	if err := s.publish(s.auth.publication()); err != nil {
		t.Fatal(err)
	}
	ca0 := s.auth.active.Cert
	t0 := issued(s.auth.active)
	prepareAt, activateAt := t0.Add(8*time.Hour), t0.Add(12*time.Hour)

	advance := func(now time.Time) time.Time {
		t.Helper()
		s.mu.Lock()
		changed := s.changed
		seq := s.bundleN
		s.mu.Unlock()
		next, err := s.advanceCAs(now)
		if err != nil {
			t.Fatalf("advanceCAs(%v): %v", now, err)
		}
		if !next.After(now) {
			t.Errorf("next decision %v is not after now %v", next, now)
		}
		select {
		case <-changed:
			if s.BundleSequence() != seq+1 {
				t.Errorf("Sync streams woken but sequence went %d -> %d", seq, s.BundleSequence())
			}
		default:
			if s.BundleSequence() != seq {
				t.Errorf("sequence went %d -> %d without waking Sync streams", seq, s.BundleSequence())
			}
		}
		return next
	}

	// Before the lead: one CA, which signs.
	if next := advance(prepareAt.Add(-time.Nanosecond)); !next.Equal(prepareAt) {
		t.Errorf("next = %v, want the prepare instant %v", next, prepareAt)
	}
	checkPublished(t, s, ca0)

	// ca_publish_lead before half-life: the successor is published, the
	// old CA keeps signing.
	if next := advance(prepareAt); !next.Equal(activateAt) {
		t.Errorf("next = %v, want the activate instant %v", next, activateAt)
	}
	ca1 := s.auth.next.Cert
	checkPublished(t, s, ca0, ca1)
	if got := s.BundleSequence(); got != 2 {
		t.Errorf("sequence after publishing the successor = %d, want 2", got)
	}
	if c := sign(t, s, time.Hour, prepareAt); !signedBy(c, ca0) {
		t.Error("SVID signed after the successor was published is not from the old CA")
	}
	// Its JWT key too keeps signing, and signs something, so it stays
	// over the hand-over (TestJWTKeyRotation covers the JWT key itself).
	mintJWT(t, s, s.cfg.JWTMaxTTL, activateAt.Add(-time.Second))
	last := sign(t, s, time.Hour, activateAt.Add(-time.Nanosecond))
	if !signedBy(last, ca0) {
		t.Error("SVID signed just before half-life is not from the old CA")
	}
	// The longest SVID the config allows, signed at the last moment, is
	// not cut short by the old CA's end.
	if c := sign(t, s, s.cfg.X509MaxTTL, activateAt.Add(-time.Second)); c.NotAfter.Before(activateAt.Add(-2 * time.Second).Add(s.cfg.X509MaxTTL)) {
		t.Errorf("x509_max_ttl SVID cut short: NotAfter %v", c.NotAfter)
	} else {
		last = c
	}

	// Half-life: the successor signs; the bundle does not change.
	if c := sign(t, s, time.Hour, activateAt); !signedBy(c, ca1) {
		t.Error("SVID signed at half-life is not from the successor")
	}
	advance(activateAt)
	checkPublished(t, s, ca1, ca0)
	if got := s.BundleSequence(); got != 2 {
		t.Errorf("sequence after the hand-over = %d, want 2 (the bundle did not change)", got)
	}

	// The old CA stays while the last SVID it signed lives. That SVID
	// outlives the successor's own half-life, so the successor's
	// successor comes in between: step through every decision instant.
	for now := activateAt; ; {
		next := advance(now)
		if now.Equal(last.NotAfter) {
			break
		}
		now = earliest(next, last.NotAfter)
	}
	if got := serials(s.bundle.X509Authorities()); !strings.Contains(strings.Join(got, ","), serialHex(ca0)) {
		t.Fatalf("old CA left the bundle before its last SVID expired: %v", got)
	}
	if _, _, err := x509svid.Verify([]*x509.Certificate{last}, s.bundle, x509svid.WithTime(last.NotAfter)); err != nil {
		t.Errorf("last SVID of the old CA does not verify at its NotAfter: %v", err)
	}
	seq := s.BundleSequence()
	advance(rotator.DropAt(last.NotAfter))
	if got := strings.Join(serials(s.bundle.X509Authorities()), ","); strings.Contains(got, serialHex(ca0)) {
		t.Errorf("old CA still published after its last SVID expired: %v", got)
	}
	checkPublished(t, s, s.bundle.X509Authorities()...)
	if got := s.BundleSequence(); got != seq+1 {
		t.Errorf("sequence after dropping the old CA = %d, want %d", got, seq+1)
	}
}

// TestCARotationSimulation runs the rotation for days at its own decision
// instants, signing the longest allowed SVID every so often, and checks
// what must always hold.
func TestCARotationSimulation(t *testing.T) {
	tests := []struct {
		name, config string
		signEvery    time.Duration
		maxCAs       int
	}{
		{"defaults", "", time.Hour, 4},
		{"one minute CA, longest lead", "ca_ttl = \"1m\"\nca_publish_lead = \"15s\"\n", 3 * time.Second, 4},
		{"one minute CA, short lead", "ca_ttl = \"1m\"\nca_publish_lead = \"1s\"\n", 7 * time.Second, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestSigner(t, t.TempDir(), tt.config)
			initial := serialHex(s.auth.active.Cert)
			start := issued(s.auth.active)
			end := start.Add(10 * s.cfg.CATTL)
			publishedAt := map[string]time.Time{initial: start}
			signsFrom := map[string]time.Time{}
			var live []*x509.Certificate
			kidPublishedAt := map[string]time.Time{s.auth.activeJWT.kid: start}
			kidSignsFrom := map[string]time.Time{}
			type liveToken struct {
				token string
				exp   time.Time
			}
			var liveTokens []liveToken
			nextTick, nextSign := start, start
			rotations := 0
			for now := start; now.Before(end); now = earliest(nextTick, nextSign) {
				if !now.Before(nextTick) {
					var err error
					if nextTick, err = s.advanceCAs(now); err != nil {
						t.Fatal(err)
					}
					if !nextTick.After(now) {
						t.Fatalf("at %v: next decision %v is not later", now, nextTick)
					}
					for _, c := range s.bundle.X509Authorities() {
						if _, ok := publishedAt[serialHex(c)]; !ok {
							publishedAt[serialHex(c)] = now
						}
					}
					for _, k := range s.auth.publishedJWT() {
						if _, ok := kidPublishedAt[k.kid]; !ok {
							kidPublishedAt[k.kid] = now
						}
					}
				}
				if !now.Before(nextSign) {
					c := sign(t, s, s.cfg.X509MaxTTL, now)
					if got := now.Add(s.cfg.X509MaxTTL).Sub(c.NotAfter); got < 0 || got >= time.Second {
						t.Errorf("at %v: SVID lifetime cut short by %v", now, got)
					}
					ca := serialHex(s.auth.active.Cert)
					if _, ok := signsFrom[ca]; !ok {
						signsFrom[ca] = now
						if ca != initial {
							rotations++
							if lead := now.Sub(publishedAt[ca]); lead < s.cfg.CAPublishLead {
								t.Errorf("CA %s signed %v after it was published, want at least ca_publish_lead %v", ca, lead, s.cfg.CAPublishLead)
							}
						}
					}
					live = append(live, c)
					tok, kid := mintJWT(t, s, s.cfg.JWTMaxTTL, now)
					if _, ok := kidSignsFrom[kid]; !ok {
						kidSignsFrom[kid] = now
						if len(kidSignsFrom) > 1 {
							if lead := now.Sub(kidPublishedAt[kid]); lead < s.cfg.CAPublishLead {
								t.Errorf("JWT key %s signed %v after it was published, want at least ca_publish_lead %v", kid, lead, s.cfg.CAPublishLead)
							}
						}
					}
					liveTokens = append(liveTokens, liveToken{tok, now.Truncate(time.Second).Add(s.cfg.JWTMaxTTL)})
					nextSign = now.Add(tt.signEvery)
				}
				kept := live[:0]
				for _, c := range live {
					if now.After(c.NotAfter) {
						continue
					}
					kept = append(kept, c)
					if _, _, err := x509svid.Verify([]*x509.Certificate{c}, s.bundle, x509svid.WithTime(now)); err != nil {
						t.Fatalf("at %v: live SVID %s does not verify against the bundle: %v", now, serialHex(c), err)
					}
				}
				live = kept
				jb := jwtBundle(t, s)
				keptTokens := liveTokens[:0]
				for _, lt := range liveTokens {
					if now.After(lt.exp) {
						continue
					}
					keptTokens = append(keptTokens, lt)
					if err := verifyAt(t, lt.token, jb, now); err != nil {
						t.Fatalf("at %v: live token (exp %v) does not validate against the JWT bundle: %v", now, lt.exp, err)
					}
				}
				liveTokens = keptTokens
				if n := len(s.bundle.X509Authorities()); n > tt.maxCAs {
					t.Fatalf("at %v: %d CAs published, want at most %d", now, n, tt.maxCAs)
				}
				if n := len(jb.JWTAuthorities()); n > tt.maxCAs {
					t.Fatalf("at %v: %d JWT keys published, want at most %d", now, n, tt.maxCAs)
				}
			}
			if rotations < 10 || len(kidSignsFrom) < 11 {
				t.Errorf("%d CA rotations and %d JWT keys used in 10 CA lifetimes, want at least 10 and 11", rotations, len(kidSignsFrom))
			}
		})
	}
}

func TestCACatchUpAfterPause(t *testing.T) {
	s := newTestSigner(t, t.TempDir(), "")
	ca0 := s.auth.active.Cert
	now := ca0.NotAfter.Add(72 * time.Hour)
	next, err := s.advanceCAs(now)
	if err != nil {
		t.Fatal(err)
	}
	active := s.auth.active.Cert
	if now.Before(active.NotBefore) || !now.Before(rotator.CAActivateAt(issued(s.auth.active), active.NotAfter)) {
		t.Errorf("active CA %v..%v is not in its signing span at %v", active.NotBefore, active.NotAfter, now)
	}
	// The first CA signed nothing: nothing keeps it.
	checkPublished(t, s, active)
	if !next.After(now) {
		t.Errorf("next = %v, not after %v", next, now)
	}
	if got := s.BundleSequence(); got != 2 {
		t.Errorf("sequence = %d, want 2: one change", got)
	}
}

func TestServerCertificateFollowsActiveCA(t *testing.T) {
	s := newTestSigner(t, t.TempDir(), "ca_ttl = \"4h\"\n")
	t0 := issued(s.auth.active)
	ca0 := s.auth.active.Cert
	c0, err := s.serverCertificate(t0)
	if err != nil {
		t.Fatal(err)
	}
	if !signedBy(c0.Leaf, ca0) {
		t.Error("TLS certificate not from the active CA")
	}
	if got := c0.Leaf.NotAfter.Sub(t0); got > 2*time.Hour {
		t.Errorf("TLS certificate lives %v, want at most ca_ttl/2", got)
	}
	if c, _ := s.serverCertificate(t0.Add(time.Minute)); c != c0 {
		t.Error("TLS certificate reissued before half-life with the same CA")
	}
	if _, err := s.advanceCAs(rotator.CAPrepareAt(t0, ca0.NotAfter, s.cfg.CAPublishLead)); err != nil {
		t.Fatal(err)
	}
	ca1 := s.auth.next.Cert
	// Hand-over happens at the next handshake, even before the rotation
	// loop has looked at the clock.
	c1, err := s.serverCertificate(rotator.CAActivateAt(t0, ca0.NotAfter))
	if err != nil {
		t.Fatal(err)
	}
	if c1 == c0 || !signedBy(c1.Leaf, ca1) {
		t.Error("TLS certificate not reissued by the new CA after the hand-over")
	}
}

func TestRestartKeepsBundleContinuous(t *testing.T) {
	dir := t.TempDir()
	s1 := newTestSigner(t, dir, "")
	if err := s1.publish(s1.auth.publication()); err != nil {
		t.Fatal(err)
	}
	t0, ca0 := issued(s1.auth.active), s1.auth.active.Cert
	old := sign(t, s1, time.Hour, time.Now())
	// Publish a successor and let it take over, so the state holds two
	// CAs, the active one having signed.
	if _, err := s1.advanceCAs(t0.Add(8 * time.Hour)); err != nil {
		t.Fatal(err)
	}
	if c := sign(t, s1, time.Hour, t0.Add(12*time.Hour)); signedBy(c, ca0) {
		t.Fatal("no hand-over")
	}
	before := s1.bundle.X509Authorities()

	s2 := newTestSigner(t, dir, "")
	if err := s2.publish(s2.auth.publication()); err != nil {
		t.Fatal(err)
	}
	got := s2.bundle.X509Authorities()
	if len(got) != len(before)+1 {
		t.Fatalf("bundle after restart has %d CAs, want the %d earlier ones and a fresh one", len(got), len(before))
	}
	for _, c := range before {
		if !s2.bundle.HasX509Authority(c) {
			t.Errorf("earlier CA %s missing after restart", serialHex(c))
		}
	}
	if _, _, err := x509svid.Verify([]*x509.Certificate{old}, s2.bundle); err != nil {
		t.Errorf("SVID issued before the restart does not verify after it: %v", err)
	}
	checkPublished(t, s2, got...)
	if c := sign(t, s2, time.Hour, time.Now()); !signedBy(c, got[0]) {
		t.Error("restarted signer does not sign with its fresh CA")
	}

	// No private key anywhere the signer writes.
	for _, root := range []string{s2.cfg.StateDir, filepath.Dir(s2.cfg.BundlePath)} {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if bytes.Contains(data, []byte("PRIVATE KEY")) {
				t.Errorf("%s mentions a private key", path)
			}
			if filepath.Base(path) == JWTStateFile || filepath.Base(path) == SignedStateFile {
				return nil // checked by TestRestartKeepsJWTKeys and TestMemoryRestartDropsUnusedCAs
			}
			readCerts(t, path) // only CERTIFICATE blocks
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func writeState(t *testing.T, dir string, blocks ...*pem.Block) string {
	t.Helper()
	var buf bytes.Buffer
	for _, b := range blocks {
		if err := pem.Encode(&buf, b); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "state", CAStateFile)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func certBlock(c *x509.Certificate) *pem.Block { return &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw} }

func TestRestartDropsExpiredCAs(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	expired, err := NewCA(testTD, time.Hour, now.Add(-48*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	valid, err := NewCA(testTD, 24*time.Hour, now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	writeState(t, dir, certBlock(expired.Cert), certBlock(valid.Cert), certBlock(valid.Cert))
	s := newTestSigner(t, dir, "")
	got := s.bundle.X509Authorities()
	if len(got) != 2 || !got[1].Equal(valid.Cert) {
		t.Errorf("bundle = %v, want the fresh CA and %s once", serials(got), serialHex(valid.Cert))
	}
	if s.bundle.HasX509Authority(expired.Cert) {
		t.Error("expired CA from state_dir published")
	}
}

func TestRestartRefusesBadState(t *testing.T) {
	ca, err := NewCA(testTD, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	other, err := NewCA(spiffeid.RequireTrustDomainFromString("example.com"), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.SignX509SVID(newPub(t), testID, time.Minute, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("not-a-real-key-but-never-echo-it")
	tests := []struct {
		name   string
		blocks []*pem.Block
		raw    string
		want   string
	}{
		{"not PEM", nil, "hello\n", "block 1: not PEM"},
		{"trailing garbage", []*pem.Block{certBlock(ca.Cert)}, "junk", "block 2: not PEM"},
		{"private key", []*pem.Block{certBlock(ca.Cert), {Type: "EC PRIVATE KEY", Bytes: secret}}, "", `block 2 is "EC PRIVATE KEY", want CERTIFICATE`},
		{"bad DER", []*pem.Block{{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x03, 1}}}, "", "block 1: x509: malformed certificate"},
		{"not a CA", []*pem.Block{certBlock(leaf)}, "", "block 1 (serial " + serialHex(leaf) + ") is not a CA of trust domain example.org"},
		{"other trust domain", []*pem.Block{certBlock(ca.Cert), certBlock(other.Cert)}, "", "block 2 (serial " + serialHex(other.Cert) + ") is not a CA of trust domain example.org"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := writeState(t, dir, tt.blocks...)
			if tt.raw != "" {
				f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				f.WriteString(tt.raw)
				f.Close()
			}
			_, err := New(testConfig(t, dir, ""), nil)
			if !errors.Is(err, ErrBadCAState) {
				t.Fatalf("New error = %v, want ErrBadCAState", err)
			}
			if want := "restore earlier CAs: unusable CA state file " + path + ": " + tt.want; err.Error() != want {
				t.Errorf("error = %q\nwant    %q", err, want)
			}
			if strings.Contains(err.Error(), string(secret)) {
				t.Error("error echoes the block's content")
			}
		})
	}
}

// TestRotateCAsLoop runs the real timer loop on synctest's fake clock.
func TestRotateCAsLoop(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		s := newTestSigner(t, dir, "ca_ttl = \"1m\"\n") // publish lead 10s: prepare at 20s, hand over at 30s
		t0 := issued(s.auth.active)
		ca0 := s.auth.active.Cert
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- s.rotateCAs(ctx) }()
		wait := func(at time.Duration) {
			time.Sleep(time.Until(t0.Add(at)))
			synctest.Wait()
		}

		wait(20*time.Second - time.Millisecond)
		if got := s.BundleSequence(); got != 1 {
			t.Errorf("sequence before the lead = %d, want 1", got)
		}
		wait(20 * time.Second)
		s.mu.Lock()
		ca1 := s.auth.next
		s.mu.Unlock()
		if ca1 == nil {
			t.Fatal("no successor at the prepare instant")
		}
		checkPublished(t, s, ca0, ca1.Cert)
		// The first CA signed nothing, so it leaves at the hand-over.
		wait(30 * time.Second)
		checkPublished(t, s, ca1.Cert)
		if got := s.BundleSequence(); got != 3 {
			t.Errorf("sequence after the hand-over = %d, want 3", got)
		}

		cancel()
		if err := <-done; err != nil {
			t.Errorf("rotateCAs: %v", err)
		}
	})
}

func TestMemoryRestartDropsUnusedCAs(t *testing.T) {
	// 20 crash-restarts in memory mode, nothing signed: the bundle holds
	// one CA, not 20. A CA that signed stays.
	dir := t.TempDir()
	s := newTestSigner(t, dir, "")
	if err := s.publish(s.auth.publication()); err != nil {
		t.Fatal(err)
	}
	used := s.auth.active.Cert
	sign(t, s, time.Hour, time.Now())
	usedKid := s.auth.activeJWT.kid
	s.mu.Lock()
	if _, err := s.auth.mintJWT(jwtClaims{sub: testID, audience: []string{"a"}, ttl: time.Minute}, time.Now()); err != nil {
		t.Fatal(err)
	}
	s.mu.Unlock()
	for range 20 {
		s = newTestSigner(t, dir, "")
		if err := s.publish(s.auth.publication()); err != nil {
			t.Fatal(err)
		}
	}
	got := s.bundle.X509Authorities()
	if len(got) != 2 || !got[0].Equal(s.auth.active.Cert) || !got[1].Equal(used) {
		t.Fatalf("bundle after 20 restarts has %d CAs, want the fresh one and the one that signed", len(got))
	}
	keys := s.auth.publishedJWT()
	if len(keys) != 2 || keys[1].kid != usedKid {
		t.Fatalf("JWT keys after 20 restarts = %d, want the fresh one and the one that signed", len(keys))
	}
}

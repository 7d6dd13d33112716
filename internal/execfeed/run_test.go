package execfeed

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

var workloadID = spiffeid.RequireFromString("spiffe://example.org/w")

// mint returns an X.509 context holding one fresh SVID for id.
func mint(t *testing.T, ca *testca.CA, id spiffeid.ID) *workloadapi.X509Context {
	t.Helper()
	cert, key := ca.SVID(t, id, nil)
	return &workloadapi.X509Context{
		SVIDs:   []*x509svid.SVID{{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}},
		Bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(id.TrustDomain(), []*x509.Certificate{ca.Cert})),
	}
}

// mintJWT signs a real JWT-SVID for p's subject and audience.
func mintJWT(t *testing.T, p jwtsvid.Params) (*jwtsvid.SVID, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: testca.Key(t)}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, err
	}
	tok, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject: p.Subject.String(), Audience: append([]string{p.Audience}, p.ExtraAudiences...),
		Expiry: jwt.NewNumericDate(time.Now().Add(time.Hour)), ID: time.Now().Format(time.RFC3339Nano),
	}).Serialize()
	if err != nil {
		return nil, err
	}
	return jwtsvid.ParseInsecure(tok, []string{p.Audience})
}

// memoryBase is a fresh tmpfs directory to hold Run's files directory,
// so that a test can see what Run leaves there.
func memoryBase(t *testing.T) string {
	t.Helper()
	if checkMemory("/dev/shm") != nil {
		t.Skip("/dev/shm is no tmpfs here")
	}
	d, err := os.MkdirTemp("/dev/shm", "execfeed-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func assertEmpty(t *testing.T, dir string) {
	t.Helper()
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("Run left %d entries in %s (%s)", len(left), dir, left[0].Name())
	}
}

// TestRunTimeout: without a usable identity within the timeout, Run
// exits 69 naming why, never starts the command, and leaves no files.
func TestRunTimeout(t *testing.T) {
	ca := testca.New(t, "ca", workloadID.TrustDomain())
	tests := []struct {
		name string
		cfg  func(*Config)
		want string
	}{
		{
			name: "nothing listens on the socket",
			cfg:  func(c *Config) { c.Addr = "unix://" + filepath.Join(t.TempDir(), "none.sock") },
			want: "none.sock",
		},
		{
			name: "only another identity is served",
			cfg: func(c *Config) {
				c.ID = spiffeid.RequireFromString("spiffe://example.org/other")
				c.source = pushing(mint(t, ca, workloadID), nil)
			},
			want: "serves none for spiffe://example.org/other",
		},
		{
			name: "the JWT-SVID never comes",
			cfg: func(c *Config) {
				c.JWTAudiences = []string{"db"}
				c.source = pushing(mint(t, ca, workloadID), func(jwtsvid.Params) (*jwtsvid.SVID, error) {
					return nil, errors.New("PermissionDenied: no identity issued")
				})
			},
			want: "no JWT-SVID: PermissionDenied: no identity issued",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			base := memoryBase(t)
			marker := filepath.Join(t.TempDir(), "started")
			cfg := Config{Timeout: 300 * time.Millisecond, Mount: MountOff, Command: []string{"touch", marker}, memoryBase: base}
			tc.cfg(&cfg)
			code, err := Run(context.Background(), cfg)
			if code != ExitNoIdentity || err == nil || !strings.Contains(err.Error(), "within 300ms") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Run = %d, %v; want %d and an error naming %q", code, err, ExitNoIdentity, tc.want)
			}
			if _, err := os.Stat(marker); err == nil {
				t.Error("the command ran without an identity")
			}
			assertEmpty(t, base)
		})
	}
}

// pushing is a source that pushes first at once.
func pushing(first *workloadapi.X509Context, jwt func(jwtsvid.Params) (*jwtsvid.SVID, error)) *fakeSource {
	src := &fakeSource{updates: make(chan *workloadapi.X509Context, 1), jwt: jwt}
	src.updates <- first
	return src
}

// TestRunFeedsAndRotates: the command starts with the first SVID in the
// files (0600 in a 0700 directory, on a memory file system) and a
// JWT-SVID; each push switches the files and sends SIGHUP, after which
// the command reads the new pair; its exit status is Run's. In a private
// mount, the files are not visible from exec's side at all.
func TestRunFeedsAndRotates(t *testing.T) {
	tests := []struct {
		name string
		mode MountMode
	}{
		{"tmpfs directory", MountOff},
		{"private mount namespace", MountRequire},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ca := testca.New(t, "ca", workloadID.TrustDomain())
			base := memoryBase(t)
			ctxs := []*workloadapi.X509Context{mint(t, ca, workloadID), mint(t, ca, workloadID), mint(t, ca, workloadID)}
			var token string
			src := pushing(ctxs[0], func(p jwtsvid.Params) (*jwtsvid.SVID, error) {
				if p.Subject != workloadID || p.Audience != "db" {
					return nil, errors.New("unexpected params")
				}
				s, err := mintJWT(t, p)
				if err == nil && token == "" {
					token = s.Marshal()
				}
				return s, err
			})
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			t.Setenv("LANYARD_EXECFEED_TEST_READS", "3")
			cfg := Config{
				Timeout: 10 * time.Second, Mount: tc.mode, Signal: syscall.SIGHUP, JWTAudiences: []string{"db"},
				Command: []string{os.Args[0], "helper-reader"}, Stdout: w, memoryBase: base, source: src,
			}
			type result struct {
				code int
				err  error
			}
			done := make(chan result, 1)
			go func() {
				code, err := Run(context.Background(), cfg)
				w.Close()
				done <- result{code, err}
			}()
			lines := bufio.NewScanner(r)
			for i, c := range ctxs {
				if i > 0 {
					src.updates <- c
				}
				if !lines.Scan() {
					res := <-done
					t.Fatalf("reader printed nothing for push %d; Run = %d, %v", i, res.code, res.err)
				}
				var rep readerReport
				if err := json.Unmarshal(lines.Bytes(), &rep); err != nil {
					t.Fatal(err)
				}
				want := readerReport{Serial: c.SVIDs[0].Certificates[0].SerialNumber.Text(16), JWT: token, KeyMode: 0o600, DirMode: 0o700, MemoryFS: true}
				if rep != want {
					t.Errorf("push %d: the command read %+v, want %+v", i, rep, want)
				}
				if tc.mode == MountRequire {
					if m, _ := filepath.Glob(filepath.Join(base, "*", currentLink)); len(m) != 0 {
						t.Errorf("files visible outside the private mount: %v", m)
					}
				}
			}
			res := <-done
			if res.code != 3 || res.err != nil {
				t.Errorf("Run = %d, %v; want the command's 3", res.code, res.err)
			}
			assertEmpty(t, base)
		})
	}
}

// TestExitStatus: the command's exit status is Run's, 128+N when signal
// N killed it, as a shell reports it.
func TestExitStatus(t *testing.T) {
	ca := testca.New(t, "ca", workloadID.TrustDomain())
	tests := []struct {
		script string
		want   int
	}{
		{"exit 0", 0},
		{"exit 7", 7},
		{"kill -KILL $$", 128 + int(syscall.SIGKILL)},
		{"kill -TERM $$", 128 + int(syscall.SIGTERM)},
	}
	for _, tc := range tests {
		t.Run(tc.script, func(t *testing.T) {
			code, err := Run(context.Background(), Config{
				Mount: MountOff, Command: []string{"sh", "-c", tc.script}, memoryBase: memoryBase(t),
				source: pushing(mint(t, ca, workloadID), nil),
			})
			if code != tc.want || err != nil {
				t.Errorf("Run = %d, %v; want %d", code, err, tc.want)
			}
		})
	}
}

// TestSignalsForwarded runs a supervisor (Run in a helper process, as
// `lanyard-agent exec` is) and sends it real signals: each reaches the
// command, and the command's exit status on SIGTERM is the supervisor's.
func TestSignalsForwarded(t *testing.T) {
	for _, mount := range []string{"off", "require"} {
		t.Run("private-mount "+mount, func(t *testing.T) {
			ca := testca.New(t, "ca", workloadID.TrustDomain())
			cert, key := ca.SVID(t, workloadID, nil)
			svid, err := json.Marshal(svidJSON{ID: workloadID.String(), Cert: pemCert(cert), Key: pemKey(t, key), Authorities: pemCert(ca.Cert)})
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "helper-supervise", os.Args[0], "helper-signals")
			cmd.Env = append(os.Environ(), svidEnv+"="+string(svid), "LANYARD_EXECFEED_TEST_MOUNT="+mount)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			lines := bufio.NewScanner(out)
			expect := func(want string) {
				t.Helper()
				if !lines.Scan() || lines.Text() != want {
					t.Fatalf("command printed %q, want %q\nsupervisor stderr:\n%s", lines.Text(), want, stderr.String())
				}
			}
			expect("ready")
			for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM} {
				if err := cmd.Process.Signal(sig); err != nil {
					t.Fatal(err)
				}
				expect("got " + unixSignalName(sig))
			}
			err = cmd.Wait()
			if code := cmd.ProcessState.ExitCode(); code != 7 {
				t.Errorf("supervisor exit %d (%v), want the command's 7\n%s", code, err, stderr.String())
			}
		})
	}
}

// TestUnprivilegedPrivateMount runs the private-mount tests again as an
// unprivileged user (uid 65534): the stage gets its mount namespace
// through a user namespace that maps only that uid.
func TestUnprivilegedPrivateMount(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run the tests as uid 65534 (run as such a user, they test this path directly)")
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "execfeed.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^(TestRunFeedsAndRotates|TestSignalsForwarded)$", "-test.v", "-test.count=1")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	os.Chmod(filepath.Dir(dir), 0o755)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("as uid 65534: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestRunFeedsAndRotates/private_mount_namespace") {
		t.Errorf("the private mount test did not pass as uid 65534:\n%s", out)
	}
}

package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"golang.org/x/sys/unix"
)

// nginxScript renders nginx.conf from the environment `lanyard-agent
// exec` gives it (the config is not secret; the paths it names lead to
// memory) and runs nginx in the foreground, reloading on SIGHUP.
const nginxScript = `cat > "$NGDIR/nginx.conf" <<EOF
pid $NGDIR/nginx.pid;
error_log stderr notice;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path $NGDIR/body;
  proxy_temp_path $NGDIR/proxy;
  fastcgi_temp_path $NGDIR/fastcgi;
  uwsgi_temp_path $NGDIR/uwsgi;
  scgi_temp_path $NGDIR/scgi;
  server {
    listen $PORT ssl;
    ssl_certificate $LANYARD_CERT_FILE;
    ssl_certificate_key $LANYARD_KEY_FILE;
    location / { return 200 "ok\n"; }
  }
}
EOF
exec nginx -e stderr -p "$NGDIR" -c "$NGDIR/nginx.conf" -g "daemon off; master_process on;"`

// startedRE reads exec's start line: the child's PID and where its
// private tmpfs is mounted (in the child's namespace only).
var startedRE = regexp.MustCompile(`command started: pid=(\d+) .*files="private tmpfs at ([^"]+)"`)

// TestExecNginx runs nginx through `lanyard-agent exec` with 10 s SVIDs:
// a TLS client pinned to the trust bundle connects over and over across
// at least two rotations; every handshake succeeds and the served
// certificate changes after each rotation (nginx reloads on the SIGHUP
// exec sends). Then no file on a disk-backed file system holds any key
// the files ever held.
func TestExecNginx(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("nginx"); err != nil {
		t.Skip("nginx is not installed: make nginx-deps")
	}
	testStart := time.Now()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, selfPolicy(tpm, "10s", "", "web"))
	e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	ngDir, port := shortDir(t), freePort(t)
	x := startEnv(t, []string{"NGDIR=" + ngDir, "PORT=" + port},
		"lanyard-agent", "exec", "--socket", e.socket, "--", "sh", "-c", nginxScript)
	x.waitLog(t, 20*time.Second, "command started")
	m := startedRE.FindStringSubmatch(x.out.String())
	if m == nil {
		t.Fatalf("exec did not start nginx in a private mount:\n%s", x.out.String())
	}
	// exec's child is nginx's master (sh exec'd it): its namespace holds
	// the files, which this side of the mount point does not see.
	childRoot := filepath.Join("/proc", m[1], "root")
	files := filepath.Join(m[2], "current")
	if _, err := os.Stat(files); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the files are visible outside nginx's mount namespace at %s: %v", files, err)
	}

	ctx := ctxFor(t, 90*time.Second)
	src := newSource(t, ctx, e.socket)
	webID := spiffeid.RequireFromString("spiffe://example.org/web")
	keys := map[string][]byte{} // PKCS#8 DER of every key the files held, by serial
	var served []string         // distinct serials nginx served, in the order first seen
	var handshakes, failures int
	waitFor(t, 60*time.Second, "nginx serving three certificates (two rotations)", func() bool {
		if serial, der, err := readFiles(filepath.Join(childRoot, files)); err == nil {
			keys[serial] = der
		}
		cfg := tlsconfig.TLSClientConfig(src, tlsconfig.AuthorizeID(webID))
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", port, cfg)
		if err != nil {
			// Until nginx listens, a refused connection is expected.
			if len(served) > 0 || !errors.Is(err, unix.ECONNREFUSED) {
				failures++
				t.Errorf("handshake %d: %v", handshakes, err)
			}
			return failures > 5
		}
		handshakes++
		serial := conn.ConnectionState().PeerCertificates[0].SerialNumber.Text(16)
		conn.Close()
		// Distinct serials: during a graceful reload nginx's old workers
		// still answer with the previous certificate for a moment.
		if !slices.Contains(served, serial) {
			served = append(served, serial)
		}
		return len(served) >= 3
	})
	if failures > 0 {
		t.Fatalf("%d of %d handshakes failed", failures, handshakes+failures)
	}
	t.Logf("%d handshakes, all succeeded; nginx served serials %v", handshakes, served)
	for _, s := range served {
		if _, ok := keys[s]; !ok {
			t.Errorf("nginx served serial %s, which the files never held (they held %d)", s, len(keys))
		}
	}
	if n := strings.Count(x.out.String(), "files switched"); n < 2 {
		t.Errorf("exec logged %d switches, want at least 2", n)
	}
	if !strings.Contains(x.out.String(), "reconfiguring") {
		t.Error("nginx never logged a reload (SIGHUP)")
	}

	// SIGINT to exec reaches nginx (fast shutdown, status 0): exec's
	// status is nginx's, and the mount point is gone.
	x.stop(t)
	if x.err != nil {
		t.Errorf("exec exited %v, want nginx's 0", x.err)
	}
	if _, err := os.Stat(m[2]); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("exec left %s: %v", m[2], err)
	}

	needles := map[string][]byte{}
	for serial, der := range keys {
		needles["key "+serial+" DER"] = der
		needles["key "+serial+" PEM"] = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		needles["key "+serial+" base64"] = []byte(base64.StdEncoding.EncodeToString(der))
	}
	for what, n := range needles {
		if strings.Contains(x.out.String(), string(n)) {
			t.Errorf("exec's or nginx's output holds %s", what)
		}
	}
	home, _ := os.UserHomeDir()
	searchDisk(t, testStart, needles, "/tmp", e.dir, ngDir, "/var", "/etc", home)
}

// readFiles reads the current cert and key through nginx's mount
// namespace and returns the serial and the key's PKCS#8 DER.
func readFiles(dir string) (string, []byte, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, "cert.pem"))
	if err != nil {
		return "", nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, "key.pem"))
	if err != nil {
		return "", nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return "", nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(pair.PrivateKey)
	if err != nil {
		return "", nil, err
	}
	return pair.Leaf.SerialNumber.Text(16), der, nil
}

// searchDisk fails the test if a regular file under roots, on a
// disk-backed file system, holds a needle. Only files modified since
// the test started are read: one holding a key minted during the test
// was written after it started. /proc, /sys, /dev and memory file
// systems are skipped (what is there is gone at reboot).
func searchDisk(t *testing.T, since time.Time, needles map[string][]byte, roots ...string) {
	t.Helper()
	since = since.Add(-time.Second)
	seen := map[string]bool{}
	var read int
	for _, root := range roots {
		if root == "" || seen[root] {
			continue
		}
		seen[root] = true
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil // vanished, or unreadable: a concurrent test's
			}
			if d.IsDir() {
				var st unix.Statfs_t
				if path == "/proc" || path == "/sys" || path == "/dev" ||
					(unix.Statfs(path, &st) == nil && (st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC || st.Type == unix.PROC_SUPER_MAGIC)) {
					return filepath.SkipDir
				}
				return nil
			}
			if !d.Type().IsRegular() {
				return nil
			}
			info, err := d.Info()
			if err != nil || info.ModTime().Before(since) {
				return nil
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return nil
			}
			read++
			for what, n := range needles {
				if strings.Contains(string(b), string(n)) {
					t.Errorf("%s holds %s", path, what)
				}
			}
			return nil
		})
	}
	if read == 0 {
		t.Error("the search read no file: the configs written by this test at least should be there")
	}
	t.Logf("searched %d files modified since %s for %d needles", read, since.Format(time.TimeOnly), len(needles))
}

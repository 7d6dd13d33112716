package execfeed

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/leakcheck"
	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"
)

// The test binary is also every process the tests need: the stage (as
// lanyard-agent is), a supervisor whose signals the test sends, and
// children that report what they see. TestMain dispatches on argv[1].
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case StageArg:
			os.Exit(Stage(os.Args[2:]))
		case "helper-supervise":
			os.Exit(helperSupervise(os.Args[2:]))
		case "helper-signals":
			os.Exit(helperSignals())
		case "helper-reader":
			os.Exit(helperReader())
		}
	}
	leakcheck.Main(m)
}

// fakeSource is the Workload API as exec sees it: the test pushes X.509
// contexts; JWT-SVIDs come from jwt. Only the transport is fake: the
// SVIDs are real certificates and keys.
type fakeSource struct {
	updates chan *workloadapi.X509Context
	jwt     func(jwtsvid.Params) (*jwtsvid.SVID, error)
}

func (f *fakeSource) WatchX509Context(ctx context.Context, w workloadapi.X509ContextWatcher) error {
	for {
		select {
		case c := <-f.updates:
			w.OnX509ContextUpdate(c)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (f *fakeSource) FetchJWTSVID(ctx context.Context, p jwtsvid.Params) (*jwtsvid.SVID, error) {
	if f.jwt == nil {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return f.jwt(p)
}

// svidJSON carries an SVID to a helper process in its environment.
type svidJSON struct {
	ID          string
	Cert, Key   []byte // PEM
	Authorities []byte // PEM
}

const svidEnv = "LANYARD_EXECFEED_TEST_SVID"

func (s svidJSON) context() (*workloadapi.X509Context, error) {
	id, err := spiffeid.FromString(s.ID)
	if err != nil {
		return nil, err
	}
	svid, err := x509svid.Parse(s.Cert, s.Key)
	if err != nil {
		return nil, err
	}
	var roots []*x509.Certificate
	for rest := s.Authorities; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		roots = append(roots, c)
	}
	return &workloadapi.X509Context{SVIDs: []*x509svid.SVID{svid}, Bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(id.TrustDomain(), roots))}, nil
}

// helperSupervise runs Run for the command in args with the SVID of
// svidEnv, as `lanyard-agent exec` would, and exits with its status.
func helperSupervise(args []string) int {
	var s svidJSON
	if err := json.Unmarshal([]byte(os.Getenv(svidEnv)), &s); err != nil {
		fmt.Fprintln(os.Stderr, "helper-supervise:", err)
		return 90
	}
	c, err := s.context()
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper-supervise:", err)
		return 90
	}
	src := &fakeSource{updates: make(chan *workloadapi.X509Context, 1)}
	src.updates <- c
	mode, _ := ParseMountMode(os.Getenv("LANYARD_EXECFEED_TEST_MOUNT"))
	code, err := Run(context.Background(), Config{
		Addr: "unix:///fake", Command: args, Signal: syscall.SIGHUP, Mount: mode, source: src,
		Log: hclog.New(&hclog.LoggerOptions{Output: os.Stderr, Level: hclog.Debug}),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper-supervise:", err)
	}
	return code
}

// helperSignals prints "ready", then "got NAME" for every forwarded
// signal; on SIGTERM it exits 7.
func helperSignals() int {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, forwarded...)
	fmt.Println("ready")
	for sig := range ch {
		fmt.Println("got", unix.SignalName(sig.(syscall.Signal)))
		if sig == syscall.SIGTERM {
			return 7
		}
	}
	return 0
}

// readerReport is what helperReader prints, one JSON line per reading.
type readerReport struct {
	Serial, JWT, Err string
	KeyMode          uint32
	DirMode          uint32
	MemoryFS         bool
}

// helperReader reads the files at start and after each SIGHUP, checks
// that cert and key are a pair, and prints a readerReport; it exits 3
// after LANYARD_EXECFEED_TEST_READS readings.
func helperReader() int {
	n, _ := strconv.Atoi(os.Getenv("LANYARD_EXECFEED_TEST_READS"))
	hup := make(chan os.Signal, 8)
	signal.Notify(hup, syscall.SIGHUP)
	enc := json.NewEncoder(os.Stdout)
	for i := 0; i < n; i++ {
		if i > 0 {
			<-hup
		}
		enc.Encode(readFiles())
	}
	return 3
}

func readFiles() readerReport {
	var r readerReport
	certPEM, err := os.ReadFile(os.Getenv(EnvCert))
	if err != nil {
		r.Err = err.Error()
		return r
	}
	keyPEM, err := os.ReadFile(os.Getenv(EnvKey))
	if err != nil {
		r.Err = err.Error()
		return r
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		r.Err = "cert and key: " + err.Error()
		return r
	}
	if _, err := os.ReadFile(os.Getenv(EnvBundle)); err != nil {
		r.Err = err.Error()
		return r
	}
	r.Serial = pair.Leaf.SerialNumber.Text(16)
	if p := os.Getenv(EnvJWT); p != "" {
		b, err := os.ReadFile(p)
		if err != nil {
			r.Err = err.Error()
			return r
		}
		r.JWT = string(b)
	}
	var st unix.Stat_t
	unix.Stat(os.Getenv(EnvKey), &st)
	r.KeyMode = st.Mode & 0o7777
	unix.Stat(filepath.Dir(filepath.Dir(os.Getenv(EnvKey))), &st)
	r.DirMode = st.Mode & 0o7777
	r.MemoryFS = checkMemory(os.Getenv(EnvKey)) == nil
	return r
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func pemKey(t *testing.T, k *ecdsa.PrivateKey) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: testca.PKCS8(t, k)})
}

func unixSignalName(s syscall.Signal) string { return unix.SignalName(s) }

package agent

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func pemOf(cs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range cs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func TestWatchTrust(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	path := filepath.Join(t.TempDir(), "bundle.pem")
	ca1, ca2 := newTestCA(t, "ca1").Cert, newTestCA(t, "ca2").Cert
	initial := pemOf(ca1)
	if err := os.WriteFile(path, initial, 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &jsonLog{} // its Write and String are safe from the watcher's goroutine
	a := New(&Config{TrustDomain: td, TrustBundlePath: path}, hclog.New(&hclog.LoggerOptions{Output: logs}))
	a.up.trust = x509bundle.FromX509Authorities(td, []*x509.Certificate{ca1})
	a.up.loaded = initial
	a.up.link = &signerConn{} // not connected: nothing to reset
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.up.watchTrust(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("watchTrust: %v", err)
		}
	}()

	steps := []struct {
		name      string
		content   []byte
		wantTrust []*x509.Certificate
		wantWake  bool
		wantLog   string // the watcher's verdict on this step
	}{
		// Garbage changes nothing; the next good file is taken.
		{"unusable file", []byte("not a bundle"), []*x509.Certificate{ca1}, false, "trust bundle file unusable"},
		{"new authority", pemOf(ca1, ca2), []*x509.Certificate{ca1, ca2}, true, "trust bundle file reloaded"},
		{"authority dropped from the file stays trusted", pemOf(ca2), []*x509.Certificate{ca1, ca2}, false, "trust bundle file reloaded"},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			wake := a.up.trustWake.C()
			seen := strings.Count(logs.String(), st.wantLog)
			tmp := path + ".tmp"
			if err := os.WriteFile(tmp, st.content, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for strings.Count(logs.String(), st.wantLog) == seen && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if strings.Count(logs.String(), st.wantLog) == seen {
				t.Fatalf("no %q log line within 5s:\n%s", st.wantLog, logs)
			}
			for _, c := range st.wantTrust {
				if !a.up.trust.HasX509Authority(c) {
					t.Errorf("%s not trusted", c.Subject.CommonName)
				}
			}
			if len(a.up.trust.X509Authorities()) != len(st.wantTrust) {
				t.Errorf("%d authorities trusted, want %d", len(a.up.trust.X509Authorities()), len(st.wantTrust))
			}
			if st.wantWake {
				select {
				case <-wake:
				case <-time.After(5 * time.Second):
					t.Error("retry loops not woken by a new authority")
				}
			}
		})
	}
}

//go:build cgo

package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// killableListener keeps every connection it accepts so that kill can cut
// them all at once, as the kernel does when a signer is killed -9.
type killableListener struct {
	net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	killed bool
}

func (l *killableListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.killed {
		c.Close()
		return nil, net.ErrClosed
	}
	l.conns = append(l.conns, c)
	return c, nil
}

func (l *killableListener) kill() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.killed = true
	l.Listener.Close()
	for _, c := range l.conns {
		c.Close()
	}
}

// replicaSigner is one independent signer serving on lis: its own CA, the
// shared policy.
type replicaSigner struct {
	addr       string
	bundlePath string
	lis        *killableListener
	stop       func() // kill -9, then wait for Serve to return
}

// startReplica serves a signer with policySrc on lis until the test ends
// or stop is called.
func startReplica(t *testing.T, policySrc string, lis net.Listener) *replicaSigner {
	t.Helper()
	s, cfg := newTestSigner(t, policySrc, hclog.NewNullLogger())
	kl := &killableListener{Listener: lis}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, kl) }()
	var once sync.Once
	r := &replicaSigner{addr: lis.Addr().String(), bundlePath: cfg.BundlePath, lis: kl}
	r.stop = func() {
		once.Do(func() {
			kl.kill()
			cancel()
			if err := <-done; err != nil && !errors.Is(err, net.ErrClosed) {
				t.Errorf("signer Serve: %v", err)
			}
		})
	}
	t.Cleanup(r.stop)
	pollLink(t, "the signer's bundle file", func() bool {
		_, err := os.Stat(cfg.BundlePath)
		return err == nil
	})
	return r
}

// listenLoopback listens on 127.0.0.1:0 and on the same port of each of
// the other 127/8 addresses: one name's several signers, as DNS would
// list them.
func listenLoopback(t *testing.T, others ...string) []net.Listener {
	t.Helper()
	for range 10 { // the port may be taken on another address: pick again
		first, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis := []net.Listener{first}
		port := strconv.Itoa(first.Addr().(*net.TCPAddr).Port)
		for _, ip := range others {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, port))
			if err != nil {
				break
			}
			lis = append(lis, l)
		}
		if len(lis) == 1+len(others) {
			return lis
		}
		for _, l := range lis {
			l.Close()
		}
	}
	t.Fatal("no port free on every loopback address")
	return nil
}

// TestFailoverBetweenReplicas: an agent given several signer replicas
// (a list, or one name with several addresses) attests with one and syncs
// with it; when that one is killed it attests with another and syncs
// there within a second, serving its SVIDs all along, and status names
// the replica in use and the one it lost.
func TestFailoverBetweenReplicas(t *testing.T) {
	tests := []struct {
		name  string
		extra []string // other loopback addresses on the first one's port: one DNS name
		n     int      // replicas on their own ports: a list
	}{
		{name: "a list of three addresses", n: 3},
		{name: "one name with two addresses", extra: []string{"127.0.0.2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tpm, ek := openSimTPM(t)
			policySrc := simPolicy(ek, fakeEK("other"))
			var lis []net.Listener
			if tt.n > 0 {
				for range tt.n {
					lis = append(lis, listenLoopback(t)...)
				}
			} else {
				lis = listenLoopback(t, tt.extra...)
			}
			// Replicas of a tier share a bundle, the union of their CAs:
			// here the agent's trust file holds all of them.
			var replicas []*replicaSigner
			var trustPEM []byte
			for _, l := range lis {
				r := startReplica(t, policySrc, l)
				replicas = append(replicas, r)
				pem, err := os.ReadFile(r.bundlePath)
				if err != nil {
					t.Fatal(err)
				}
				trustPEM = append(trustPEM, pem...)
			}
			trustPath := filepath.Join(t.TempDir(), "trust.pem")
			if err := os.WriteFile(trustPath, trustPEM, 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := &Config{TrustDomain: simTD(), TrustBundlePath: trustPath}
			for _, r := range replicas {
				cfg.SignerAddresses = append(cfg.SignerAddresses, r.addr)
			}
			var resolver resolveFunc
			if len(tt.extra) > 0 {
				port := strconv.Itoa(lis[0].Addr().(*net.TCPAddr).Port)
				cfg.SignerAddresses = []string{net.JoinHostPort("signers.test", port)}
				resolver = func(_ context.Context, host string) ([]string, error) {
					if host != "signers.test" {
						return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
					}
					return append([]string{"127.0.0.1"}, tt.extra...), nil
				}
			}
			a := runReplicaAgent(t, cfg, trustPath, tpm, resolver)

			waitReady(t, a, 30*time.Second)
			pollLink(t, "the agent synced", func() bool { return a.Report(time.Now()).Signer.Connected })
			rep := a.Report(time.Now())
			if got := len(rep.Signer.Candidates); got != len(replicas) {
				t.Fatalf("status lists %d candidates %v, want %d", got, rep.Signer.Candidates, len(replicas))
			}
			killed := slices.IndexFunc(replicas, func(r *replicaSigner) bool { return r.addr == rep.Signer.Address })
			if killed < 0 {
				t.Fatalf("status names %q in use, not one of the replicas", rep.Signer.Address)
			}
			served := servedSVID(t, a)

			start := time.Now()
			replicas[killed].stop()
			var took time.Duration
			for deadline := start.Add(10 * time.Second); ; {
				// Workloads are served from the cache throughout.
				if now := time.Now(); !now.Before(servedSVID(t, a).NotAfter) {
					t.Fatalf("served an expired SVID at %v", now)
				}
				r := a.Report(time.Now())
				if r.Signer.Connected && r.Signer.Address != replicas[killed].addr && r.Signer.LastSync != nil && r.Signer.LastSync.After(start) {
					took = time.Since(start)
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no sync with another replica 10s after the kill: %+v", r.Signer)
				}
				time.Sleep(time.Millisecond)
			}
			t.Logf("synced with another replica %v after the kill", took)
			if took > time.Second {
				t.Errorf("the switch took %v, want under a second", took)
			}

			rep = a.Report(time.Now())
			if len(rep.Signer.Unreachable) != 1 || rep.Signer.Unreachable[0].Address != replicas[killed].addr || rep.Signer.Unreachable[0].Error == "" {
				t.Errorf("status unreachable = %+v, want the killed replica %s with its error", rep.Signer.Unreachable, replicas[killed].addr)
			}
			if got := servedSVID(t, a); got.SerialNumber.Cmp(served.SerialNumber) != 0 {
				t.Errorf("the served SVID changed across the switch (serial %x, was %x): it was valid", got.SerialNumber, served.SerialNumber)
			}
			// Signing goes to the replica the agent attested with now.
			now := replicas[slices.IndexFunc(replicas, func(r *replicaSigner) bool { return r.addr == rep.Signer.Address })]
			checkSignsWith(t, a, now)
		})
	}
}

// runReplicaAgent runs the agent's upstream, renewer and JWT source on
// the simulator TPM, wired as Agent.Run wires them, until the test ends.
func runReplicaAgent(t *testing.T, cfg *Config, trustPath string, tpm *node.TPM, resolver resolveFunc) *Agent {
	t.Helper()
	a := New(cfg, nil)
	if resolver != nil {
		a.up.replicas.resolve = resolver
	}
	trustSrc, err := os.ReadFile(trustPath)
	if err != nil {
		t.Fatal(err)
	}
	trust, err := x509bundle.Parse(cfg.TrustDomain, trustSrc)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := newSignerConn(a.up.replicas, cfg.TrustDomain, newTPMLink(tpm, nil, nil), trust, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.close) // after the parts have stopped
	a.started = time.Now()
	a.up.link, a.up.trust, a.up.loaded, a.renew.signer = conn, trust, trustSrc, conn
	runPart(t, a.up.Run)
	runPart(t, a.renew.Run)
	runPart(t, a.jwt.Run)
	return a
}

// servedSVID is the leaf a workload of uid 1000 (entry "mine") is served.
func servedSVID(t *testing.T, a *Agent) *x509.Certificate {
	t.Helper()
	resp, _ := a.cache.X509SVIDResponse([]string{"unix:uid:1000"})
	if resp == nil || len(resp.GetSvids()) != 1 {
		t.Fatalf("no SVID served to uid 1000: %v", resp)
	}
	chain, err := x509.ParseCertificates(resp.GetSvids()[0].GetX509Svid())
	if err != nil {
		t.Fatal(err)
	}
	return chain[0]
}

// checkSignsWith has the agent's connection sign a CSR for entry "mine"
// and checks that r signed it.
func checkSignsWith(t *testing.T, a *Agent, r *replicaSigner) {
	t.Helper()
	csr, _ := newCSR(t, nil)
	resp, err := a.renew.signer.signX509SVIDs(callCtx(t), &signerpb.SignX509SVIDsRequest{Csrs: []*signerpb.CSR{{EntryId: "mine", Csr: csr}}})
	if err != nil {
		t.Fatalf("SignX509SVIDs after the switch: %v", err)
	}
	if len(resp.GetSvids()) != 1 || resp.GetSvids()[0].GetError() != "" {
		t.Fatalf("SignX509SVIDs answered %v", resp.GetSvids())
	}
	var chain []*x509.Certificate
	for _, der := range resp.GetSvids()[0].GetChain() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	own, err := x509bundle.Load(simTD(), r.bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(chain, own); err != nil {
		t.Errorf("the SVID signed after the switch does not verify against the replica in use (%s): %v", r.addr, err)
	}
}

// deadAddress is a loopback address nothing listens on: connecting is
// refused, as with a replica killed -9.
func deadAddress(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestAttestTriesAnotherReplica: an attestation that cannot reach the
// replica it chose tries another at once, each at most once; a refusal is
// the tier's answer and ends it, since every replica would say the same.
func TestAttestTriesAnotherReplica(t *testing.T) {
	tpm, ek := openSimTPM(t)
	live := startSigner(t, simPolicy(ek, fakeEK("other")))
	refusing := startSigner(t, simPolicy(fakeEK("someone else"), fakeEK("other")))
	untrusted := startSigner(t, simPolicy(ek, fakeEK("other"))) // its CA is not in the agent's trust
	dead, dead2 := deadAddress(t), deadAddress(t)
	trust := x509bundle.New(simTD())
	for _, s := range []*simSigner{live, refusing} {
		for _, c := range s.trust.X509Authorities() {
			trust.AddX509Authority(c)
		}
	}
	tests := []struct {
		name            string
		addrs           []string // the first is drawn first
		wantCode        codes.Code
		wantInUse       string
		wantUnreachable []string
	}{
		{"unreachable, then a live one", []string{dead, live.addr}, codes.OK, live.addr, []string{dead}},
		{"CA not trusted, then a live one", []string{untrusted.addr, live.addr}, codes.OK, live.addr, []string{untrusted.addr}},
		{"refused: no other tried", []string{refusing.addr, live.addr}, codes.PermissionDenied, "", nil},
		{"all unreachable", []string{dead, dead2}, codes.Unavailable, "", []string{dead, dead2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs := newReplicaSet(tt.addrs, nil)
			rs.rand = func(int) int { return 0 }
			u, err := newSignerConn(rs, simTD(), newTPMLink(tpm, nil, nil), trust, hclog.NewNullLogger())
			if err != nil {
				t.Fatal(err)
			}
			defer u.close()
			_, _, err = u.attest(callCtx(t))
			if got := status.Code(err); got != tt.wantCode {
				t.Fatalf("attest: %v, want code %v", err, tt.wantCode)
			}
			rs.mu.Lock()
			inUse := rs.inUse.addr
			rs.mu.Unlock()
			if inUse != tt.wantInUse {
				t.Errorf("in use: %q, want %q", inUse, tt.wantInUse)
			}
			var unreachable []string
			for _, u := range rs.snapshot(time.Now()).Unreachable {
				unreachable = append(unreachable, u.Address)
			}
			if !slices.Equal(unreachable, tt.wantUnreachable) {
				t.Errorf("unreachable: %v, want %v", unreachable, tt.wantUnreachable)
			}
		})
	}
}

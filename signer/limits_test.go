package signer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// servedSigner is a Signer serving on loopback, with what a client needs.
type servedSigner struct {
	*Signer
	addr  string
	trust *x509bundle.Bundle
	logs  *syncBuffer
	stop  func() error // ends Serve and returns its error; safe to call twice
}

// syncBuffer is a log sink safe to read while the signer writes.
type syncBuffer = testlog.Buffer

// serveTestSigner runs a signer from testConfig (plus policy, when set) on
// 127.0.0.1 until the test ends, with its log in JSON in logs.
func serveTestSigner(t *testing.T, policySrc, extra string) *servedSigner {
	t.Helper()
	dir := t.TempDir()
	cfg := testConfig(t, dir, extra)
	if policySrc != "" {
		if err := os.WriteFile(cfg.PolicyPath, []byte(policySrc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	logs := &syncBuffer{}
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Output: logs, JSONFormat: true, Level: hclog.Info}))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	stop := sync.OnceValue(func() error {
		cancel()
		return <-done
	})
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	select {
	case <-s.Ready():
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	trust, err := x509bundle.Load(testTD, cfg.BundlePath)
	if err != nil {
		t.Fatal(err)
	}
	return &servedSigner{Signer: s, addr: lis.Addr().String(), trust: trust, logs: logs, stop: stop}
}

// dial connects to the signer from source IP from (e.g. "127.0.0.2": the
// whole of 127/8 is loopback), as an agent before attestation does: TLS,
// no client certificate. The connection closes when the test ends.
func (s *servedSigner) dial(t *testing.T, from string) signerpb.SignerClient {
	t.Helper()
	return signerpb.NewSignerClient(s.dialAs(t, from, nil))
}

// dialAs is dial presenting svid, when not nil, as an attested agent does.
func (s *servedSigner) dialAs(t *testing.T, from string, svid *x509svid.SVID) *grpc.ClientConn {
	t.Helper()
	signerID := spiffeid.RequireFromSegments(testTD, "lanyard", "signer")
	tlsConf := tlsconfig.TLSClientConfig(s.trust, tlsconfig.AuthorizeID(signerID))
	if svid != nil {
		tlsConf = tlsconfig.MTLSClientConfig(svid, s.trust, tlsconfig.AuthorizeID(signerID))
	}
	local := &net.TCPAddr{IP: net.ParseIP(from)}
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{LocalAddr: local}).DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// agentSVID makes id a known agent of node "lab" and returns an SVID for
// it from the signer's CA, as Attest would.
func (s *servedSigner) agentSVID(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	cert, err := s.auth.sign(key.Public(), id, time.Hour, nil, time.Now())
	if err == nil {
		// The EK testConfig and jwtPolicy pin as node "lab", so a
		// policy reload keeps the agent.
		n := &node.Node{EKSHA256: strings.Repeat("ab", 32), Names: []string{"lab"}}
		s.agents[id] = &agentRecord{node: n, names: n.Names, notAfter: cert.NotAfter}
	}
	s.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

// waitInFlight polls until want Attest streams are in flight.
func waitInFlight(t *testing.T, s *Signer, want int) {
	t.Helper()
	eventually(t, "attestations in flight", func() bool { n, _ := s.gate.inFlight(); return n == want })
}

// TestAttestLimits fills the per-address cap from one address and the
// total cap from a second, and checks who is refused, with which code and
// message, and that a slot freed is a slot reusable.
func TestAttestLimits(t *testing.T) {
	s := serveTestSigner(t, "", `limits {
  attest_first_message_timeout         = "30s"
  max_pending_attestations             = 6
  max_pending_attestations_per_address = 4
}
`)
	// Bounded, so a stream that is never refused fails the test in time.
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	// open starts an Attest stream that sends nothing; refused at once
	// when a cap is full, otherwise held until its context ends.
	open := func(c signerpb.SignerClient, ctx context.Context) signerpb.Signer_AttestClient {
		t.Helper()
		st, err := c.Attest(ctx)
		if err != nil {
			t.Fatalf("Attest: %v", err)
		}
		return st
	}
	refused := func(st signerpb.Signer_AttestClient, wantMsg string) {
		t.Helper()
		_, err := st.Recv()
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), wantMsg) {
			t.Fatalf("stream over the cap: %v, want ResourceExhausted naming %s", err, wantMsg)
		}
	}

	one, two, three := s.dial(t, "127.0.0.1"), s.dial(t, "127.0.0.2"), s.dial(t, "127.0.0.3")
	firstCtx, cancelFirst := context.WithCancel(ctx)
	open(one, firstCtx)
	for range 3 {
		open(one, ctx)
	}
	waitInFlight(t, s.Signer, 4)
	refused(open(one, ctx), "limits.max_pending_attestations_per_address")

	// Another address still gets in, up to the total.
	open(two, ctx)
	open(two, ctx)
	waitInFlight(t, s.Signer, 6)
	refused(open(three, ctx), "limits.max_pending_attestations)")

	// A stream that ends frees its slot.
	cancelFirst()
	waitInFlight(t, s.Signer, 5)
	st := open(three, ctx)
	if err := st.Send(&signerpb.AttestRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("stream after a slot was freed: %v, want InvalidArgument (no evidence): it was admitted", err)
	}

	m := s.metrics.limitRefusals
	if got := testutil.ToFloat64(m.WithLabelValues(limitPendingPerAddress)); got != 1 {
		t.Errorf("limit_refusals_total{limit=%q} = %v, want 1", limitPendingPerAddress, got)
	}
	if got := testutil.ToFloat64(m.WithLabelValues(limitPending)); got != 1 {
		t.Errorf("limit_refusals_total{limit=%q} = %v, want 1", limitPending, got)
	}
	cancel()
	waitInFlight(t, s.Signer, 0)
	if _, peak := s.gate.inFlight(); peak != 6 {
		t.Errorf("peak in flight = %d, want the total cap 6", peak)
	}
}

// TestSyncStreamsPerAgent: a third Sync stream of one agent ends that
// agent's oldest with Aborted; the two newest, and other agents' streams,
// keep receiving.
func TestSyncStreamsPerAgent(t *testing.T) {
	s := serveTestSigner(t, "", "")
	agentA := spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/aa")
	agentB := spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/bb")
	svidA, svidB := s.agentSVID(t, agentA), s.agentSVID(t, agentB)
	// Bounded, so a stream that is never ended fails the test in time.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	sync := func(svid *x509svid.SVID) signerpb.Signer_SyncClient {
		t.Helper()
		// One connection per stream, as an agent reconnecting would.
		st, err := signerpb.NewSignerClient(s.dialAs(t, "127.0.0.1", svid)).Sync(ctx, &signerpb.SyncRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatalf("first Sync message: %v", err)
		}
		return st
	}
	b1, b2 := sync(svidB), sync(svidB)
	a1, a2 := sync(svidA), sync(svidA)
	a3 := sync(svidA)

	_, err := a1.Recv()
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "limits.max_sync_streams_per_agent") {
		t.Fatalf("oldest stream after a third: %v, want Aborted naming limits.max_sync_streams_per_agent", err)
	}
	// Everyone else is alive: a bundle change reaches each stream.
	t0 := issued(s.auth.active)
	if _, err := s.advanceCAs(rotator.CAPrepareAt(t0, s.auth.active.Cert.NotAfter, s.cfg.CAPublishLead)); err != nil {
		t.Fatal(err)
	}
	for name, st := range map[string]signerpb.Signer_SyncClient{"a2": a2, "a3": a3, "b1": b1, "b2": b2} {
		msg, err := st.Recv()
		if err != nil || msg.GetBundle().GetSequence() != 2 {
			t.Errorf("stream %s after the bundle change: %v, %v; want sequence 2", name, msg.GetBundle().GetSequence(), err)
		}
	}
	if got := testutil.ToFloat64(s.metrics.limitRefusals.WithLabelValues(limitSyncStreams)); got != 1 {
		t.Errorf("limit_refusals_total{limit=%q} = %v, want 1", limitSyncStreams, got)
	}
	if !strings.Contains(s.logs.String(), `"sync stream replaced: limit reached"`) {
		t.Errorf("no warning about the replaced stream in the log:\n%s", s.logs)
	}
}

// TestJWTMintRateLimit runs in a synctest bubble: time stands still
// between calls, so the bucket refills only when the test says.
func TestJWTMintRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newJWTTestSigner(t, t.TempDir(), "limits {\n  jwt_mints_per_second = 2\n  jwt_mint_burst = 5\n}\n")
		other := spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/cd")
		s.agents[other] = &agentRecord{names: []string{"lab"}}
		a := &api{s: s}
		ctxA := agentContext(t, s)
		ctxB := agentContextFor(t, s, other)
		mint := func(ctx context.Context, n int) error {
			reqs := make([]*signerpb.JWTSVIDRequest, n)
			for i := range reqs {
				reqs[i] = &signerpb.JWTSVIDRequest{EntryId: "mine", Audience: []string{"x"}}
			}
			_, err := a.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: reqs})
			return err
		}
		steps := []struct {
			name  string
			ctx   context.Context
			n     int
			sleep time.Duration // before the call
			want  codes.Code
		}{
			{"burst, one call", ctxA, 3, 0, codes.OK},
			{"burst, rest", ctxA, 2, 0, codes.OK},
			{"beyond the burst", ctxA, 1, 0, codes.ResourceExhausted},
			{"again beyond", ctxA, 1, 0, codes.ResourceExhausted},
			{"another agent is unaffected", ctxB, 5, 0, codes.OK},
			{"refilled by the rate", ctxA, 1, 500 * time.Millisecond, codes.OK},
			{"refill spent", ctxA, 1, 0, codes.ResourceExhausted},
			{"two seconds refill four", ctxA, 4, 2 * time.Second, codes.OK},
			{"a call larger than the burst costs the burst", ctxA, 50, 10 * time.Second, codes.OK},
			{"and empties it", ctxA, 1, 0, codes.ResourceExhausted},
		}
		for _, st := range steps {
			time.Sleep(st.sleep)
			err := mint(st.ctx, st.n)
			if status.Code(err) != st.want {
				t.Fatalf("%s: %v, want %v", st.name, err, st.want)
			}
			if st.want == codes.ResourceExhausted && !strings.Contains(err.Error(), "limits.jwt_mints_per_second") {
				t.Errorf("%s: %v does not name the limit", st.name, err)
			}
		}
		if got := testutil.ToFloat64(s.metrics.limitRefusals.WithLabelValues(limitJWTMintRate)); got != 4 {
			t.Errorf("limit_refusals_total{limit=%q} = %v, want 4", limitJWTMintRate, got)
		}
	})
}

// TestBundlePersistedBeforePush: an agent that receives a bundle finds
// the same CAs in bundle_path; when the file cannot be written, no agent
// receives the new bundle at all.
func TestBundlePersistedBeforePush(t *testing.T) {
	s := serveTestSigner(t, jwtPolicy, "")
	stream, err := signerpb.NewSignerClient(s.dialAs(t, "127.0.0.1", s.agentSVID(t, testAgent))).Sync(t.Context(), &signerpb.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || first.GetBundle().GetSequence() != 1 {
		t.Fatalf("first message: sequence %d, %v", first.GetBundle().GetSequence(), err)
	}
	onDisk := func() []string { return serials(readCerts(t, s.cfg.BundlePath)) }
	received := func(m *signerpb.SyncResponse) []string {
		var out []string
		for _, der := range m.GetBundle().GetX509Authorities() {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, serials([]*x509.Certificate{c})...)
		}
		return out
	}
	t0 := issued(s.auth.active)
	ca0 := s.auth.active.Cert

	// A rotation whose bundle cannot be written: make bundle_path's
	// directory a regular file (root ignores permissions).
	dir := filepath.Dir(s.cfg.BundlePath)
	if err := os.Rename(dir, dir+".away"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.advanceCAs(rotator.CAPrepareAt(t0, ca0.NotAfter, s.cfg.CAPublishLead)); err == nil {
		t.Fatal("advanceCAs wrote the bundle into a file")
	}
	// Wake every stream with a policy change: the next message must still
	// carry the bundle on disk, not the one that could not be written.
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir+".away", dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.cfg.PolicyPath, []byte(jwtPolicy+"workload \"new\" {\n  spiffe_id = \"spiffe://example.org/new\"\n  nodes = [\"lab\"]\n  selectors = [\"unix:uid:7\"]\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if seq := next.GetBundle().GetSequence(); seq != 1 || len(next.GetEntries()) != len(first.GetEntries())+1 {
		t.Fatalf("after a failed write: sequence %d with %d entries; want the policy change alone (sequence 1, %d entries)",
			seq, len(next.GetEntries()), len(first.GetEntries())+1)
	}
	if got, want := received(next), onDisk(); !cmp.Equal(got, want) {
		t.Errorf("stream holds CAs %v, bundle_path %v", got, want)
	}
}

// agentContextFor is agentContext for any agent ID.
func agentContextFor(t *testing.T, s *Signer, id spiffeid.ID) context.Context {
	t.Helper()
	s.mu.Lock()
	leaf, err := s.auth.sign(newPub(t), id, time.Hour, nil, time.Now())
	s.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	info := credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}}
	return peer.NewContext(t.Context(), &peer.Peer{AuthInfo: info})
}

func TestLogLimiter(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l := newLogLimiter(10 * time.Second)
	type step struct {
		at             time.Duration
		source         string
		ok             bool
		wantSuppressed int
	}
	for i, st := range []step{
		{0, "a", true, 0},
		{time.Second, "a", false, 0},
		{2 * time.Second, "a", false, 0},
		{3 * time.Second, "b", true, 0}, // sources are independent
		{10 * time.Second, "a", true, 2},
		{11 * time.Second, "a", false, 0},
		{30 * time.Second, "a", true, 1},
		{41 * time.Second, "a", true, 0},
	} {
		ok, n := l.allow(st.source, t0.Add(st.at))
		if ok != st.ok || n != st.wantSuppressed {
			t.Errorf("step %d (%s at %v): allow = %v, %d; want %v, %d", i, st.source, st.at, ok, n, st.ok, st.wantSuppressed)
		}
	}
	// Beyond maxTrackedLogSources live sources, new ones share one line.
	l = newLogLimiter(10 * time.Second)
	for i := range maxTrackedLogSources {
		l.allow(string(rune(0x10000+i)), t0)
	}
	if ok, _ := l.allow("new-1", t0); !ok {
		t.Error("the first untracked source was not let through")
	}
	if ok, _ := l.allow("new-2", t0); ok {
		t.Error("a second untracked source got its own line")
	}
	if len(l.sources) != maxTrackedLogSources+1 {
		t.Errorf("%d sources tracked, want %d", len(l.sources), maxTrackedLogSources+1)
	}
	// Once their windows pass, old sources are forgotten to make room.
	if ok, _ := l.allow("new-3", t0.Add(10*time.Second)); !ok || len(l.sources) > 2 {
		t.Errorf("after the window: allow = %v with %d sources, want true and the old ones pruned", ok, len(l.sources))
	}
}

func TestMintLimiterForgetsIdleAgents(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m := newMintLimiter(Limits{JWTMintsPerSecond: 10, JWTMintBurst: 10})
	for i := range 3 * maxIdleBucketsUnchecked {
		id := spiffeid.RequireFromPathf(testTD, "/lanyard/agent/tpm/%d", i)
		if !m.take(id, 10, t0.Add(time.Duration(i)*time.Millisecond)) {
			t.Fatalf("agent %d refused on its first call", i)
		}
	}
	// Every bucket refills within a second: after that, a sweep keeps
	// none of them, and the map never held more than twice the sweep
	// threshold.
	if len(m.buckets) > 2*maxIdleBucketsUnchecked {
		t.Errorf("%d buckets held, want at most %d", len(m.buckets), 2*maxIdleBucketsUnchecked)
	}
	m.mu.Lock()
	m.sweepLocked(t0.Add(time.Hour))
	m.mu.Unlock()
	if len(m.buckets) != 0 {
		t.Errorf("%d idle buckets kept after a sweep", len(m.buckets))
	}
}

//go:build cgo

package signer_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// openSeeded opens the simulator with a fixed seed: the same seed gives
// the same EK, so the EK can be pinned before the agent attests.
func openSeeded(seed int64) (*node.TPM, error) {
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	tpm, err := node.OpenTPMChannel(sim)
	if err != nil {
		sim.Close()
		return nil, fmt.Errorf("OpenTPMChannel: %w", err)
	}
	return tpm, nil
}

// syncWatch counts, for the entry count it is armed with, how many streams
// have received a Sync message with that many entries.
type syncWatch struct {
	mu        sync.Mutex
	want      int
	remaining int
	last      time.Time
	reached   chan struct{}
	counted   []int // per stream, the entry count it was last counted for
	ends      <-chan streamEnd
}

func (w *syncWatch) arm(want, streams int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.want, w.remaining, w.reached = want, streams, make(chan struct{})
	clear(w.counted)
}

func (w *syncWatch) note(i, entries int, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if entries != w.want || w.counted[i] == entries {
		return
	}
	w.counted[i] = entries
	w.last = at
	if w.remaining--; w.remaining == 0 {
		close(w.reached)
	}
}

// wait returns when the last stream was counted.
func (w *syncWatch) wait() (time.Time, error) {
	w.mu.Lock()
	reached := w.reached
	w.mu.Unlock()
	select {
	case <-reached:
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.last, nil
	case e := <-w.ends:
		return time.Time{}, fmt.Errorf("stream %d ended: %w", e.i, e.err)
	case <-time.After(scaleTimeout):
		w.mu.Lock()
		defer w.mu.Unlock()
		return time.Time{}, fmt.Errorf("%d streams lack the edit after %v", w.remaining, scaleTimeout)
	}
}

// attestAgent attests the TPM with the signer, as the agent's upstream
// does, and returns the agent SVID whose key stays in the TPM.
func attestAgent(ctx context.Context, s *scaleSigner, tpm *node.TPM, ekHash string) (*x509svid.SVID, error) {
	sess, err := tpm.NewSession()
	if err != nil {
		return nil, fmt.Errorf("NewSession: %w", err)
	}
	ev, err := sess.Evidence()
	if err != nil {
		return nil, fmt.Errorf("Evidence: %w", err)
	}
	signerID := spiffeid.RequireFromSegments(scaleTD, "lanyard", "signer")
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.TLSClientConfig(s.trust, tlsconfig.AuthorizeID(signerID)))))
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	stream, err := signerpb.NewSignerClient(cc).Attest(ctx)
	if err != nil {
		return nil, fmt.Errorf("Attest: %w", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_Evidence{Evidence: &signerpb.Evidence{
		EkCertificate: ev.EKCertificate,
		EkPublic:      ev.EKPublic,
		Ak:            &signerpb.TPMObject{Public: ev.AK.Public, CreateData: ev.AK.CreateData, CreateAttestation: ev.AK.CreateAttestation, CreateSignature: ev.AK.CreateSignature},
		Key:           &signerpb.TPMObject{Public: ev.Key.Public, CreateData: ev.Key.CreateData, CreateAttestation: ev.Key.CreateAttestation, CreateSignature: ev.Key.CreateSignature},
		Csr:           ev.CSR,
	}}}); err != nil {
		return nil, fmt.Errorf("send evidence: %w", err)
	}
	resp, err := stream.Recv()
	if err != nil || resp.GetChallenge() == nil {
		return nil, fmt.Errorf("challenge: %v %v", resp, err)
	}
	secret, err := sess.Activate(attest.EncryptedCredential{Credential: resp.GetChallenge().GetCredential(), Secret: resp.GetChallenge().GetSecret()})
	if err != nil {
		return nil, fmt.Errorf("Activate: %w", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_ActivationSecret{ActivationSecret: secret}}); err != nil {
		return nil, fmt.Errorf("send answer: %w", err)
	}
	if resp, err = stream.Recv(); err != nil || len(resp.GetResult().GetSvid()) == 0 {
		return nil, fmt.Errorf("attest result: %v %v", resp, err)
	}
	leaf, err := x509.ParseCertificate(resp.GetResult().GetSvid()[0])
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: spiffeid.RequireFromPath(scaleTD, "/lanyard/agent/tpm/"+ekHash), Certificates: []*x509.Certificate{leaf}, PrivateKey: sess.Signer()}, nil
}

// streamEnd is one Sync stream ending, on the agent side.
type streamEnd struct {
	i   int
	err error
	at  time.Time
}

// scaleGroup is one simulated TPM and the streams [from, to) it holds.
type scaleGroup struct {
	seed     int64
	ek       string
	from, to int
	conns    []*grpc.ClientConn
	had      time.Time // when connect last had the simulator
	// stop ends the group's current streams when connect replaces them
	// (an agent's renewal): their end is the agent's own doing, not
	// reported on the fleet's ends.
	stop context.CancelFunc
}

// scaleFleet is the simulated agents: groups of streams, one per TPM.
type scaleFleet struct {
	ctx    context.Context
	groups []*scaleGroup
	w      *syncWatch
	// tw counts the token revocations each stream's messages carry.
	tw   *syncWatch
	ends chan streamEnd
	wg   sync.WaitGroup
	// sim is held while a group's simulator is open: the simulator is
	// one per process.
	sim sync.Mutex
}

// connect attests the group's TPM with sig and opens its Sync streams,
// each on its own connection whose handshake the TPM key signs; it
// returns when each has its first message, with the times they came. A
// group already connected closes its old connections first, as an agent
// that attested again (a renewal, or with another replica) does.
func (f *scaleFleet) connect(g *scaleGroup, sig *scaleSigner) ([]time.Time, error) {
	f.sim.Lock()
	defer f.sim.Unlock()
	g.had = time.Now()
	tpm, err := openSeeded(g.seed)
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	svid, err := attestAgent(f.ctx, sig, tpm, g.ek)
	if err != nil {
		return nil, err
	}
	if g.stop != nil {
		g.stop()
	}
	for _, cc := range g.conns {
		cc.Close()
	}
	g.conns = nil
	sctx, stop := context.WithCancel(f.ctx)
	g.stop = stop
	signerID := spiffeid.RequireFromSegments(scaleTD, "lanyard", "signer")
	var firsts []time.Time
	for i := g.from; i < g.to; i++ {
		cc, err := grpc.NewClient(sig.addr, grpc.WithTransportCredentials(credentials.NewTLS(
			tlsconfig.MTLSClientConfig(svid, sig.trust, tlsconfig.AuthorizeID(signerID)))))
		if err != nil {
			return nil, err
		}
		g.conns = append(g.conns, cc)
		stream, err := signerpb.NewSignerClient(cc).Sync(sctx, &signerpb.SyncRequest{})
		if err != nil {
			return nil, fmt.Errorf("Sync %d: %w", i, err)
		}
		first, err := stream.Recv()
		if err != nil {
			return nil, fmt.Errorf("Sync %d first message: %w", i, err)
		}
		now := time.Now()
		firsts = append(firsts, now)
		f.w.note(i, len(first.GetEntries()), now)
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			for {
				msg, err := stream.Recv()
				if err != nil {
					if sctx.Err() == nil {
						f.ends <- streamEnd{i: i, err: err, at: time.Now()}
					}
					return
				}
				now := time.Now()
				f.w.note(i, len(msg.GetEntries()), now)
				f.tw.note(i, len(msg.GetTokenRevocations()), now)
			}
		}()
	}
	return firsts, nil
}

// reconnect is what an agent does when its Sync stream ends because the
// signer went away: dial again every 50 ms until the signer answers
// (bounded by scaleTimeout), attest again (the restarted signer knows no
// agent) and open the streams again.
func (f *scaleFleet) reconnect(g *scaleGroup, sig *scaleSigner) ([]time.Time, error) {
	deadline := time.Now().Add(scaleTimeout)
	for {
		var firsts []time.Time
		c, err := net.DialTimeout("tcp", sig.addr, time.Second)
		if err == nil {
			c.Close()
			if firsts, err = f.connect(g, sig); err == nil {
				return firsts, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("agent %s not re-synced after %v: %w", g.ek, scaleTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// BenchmarkSignerScale: see scale_child_test.go and the file comment of
// scale_bench_test.go. Metrics:
//
//	agents, tpms                 Sync streams held, distinct TPMs (agent IDs) behind them
//	edits                        policy edits timed
//	attest-ms                    median wall time of one attestation, TPM (simulator) work included
//	edit-last-p50-ms, -p99-ms    policy edit (reload: read, parse, SetPolicy) until the last stream has it
//	signer-rss-idle-mib          signer RSS before any agent
//	signer-rss-mib               signer RSS holding every stream, after the edits
//	signer-cpu-ms/edit           signer user+sys CPU per edit (10 ms ticks)
//	signer-start-ms              SIGKILLed signer started again: exec to serving (TPM unseal included)
//	resync-p50-ms, -p99-ms       restarted signer serving until a stream has its first message again
//	resync-own-p50-ms, -p99-ms   the same from the moment its TPM's simulator was free (see below)
//	revokes                      node revocations timed
//	revoke-p50-ms, -p99-ms       revoke (the Signer method the admin socket calls) until that agent's last stream ended
//
// newScaleFleet is a fleet of agents streams, none connected yet, whose
// watch waits for scaleWorkloads entries on every stream.
func newScaleFleet(ctx context.Context, agents int) *scaleFleet {
	ends := make(chan streamEnd, 4*agents)
	f := &scaleFleet{ctx: ctx, ends: ends, w: &syncWatch{counted: make([]int, agents), ends: ends},
		tw: &syncWatch{counted: make([]int, agents), ends: ends}}
	f.w.arm(scaleWorkloads, agents)
	f.tw.arm(-1, agents) // nothing to count until a token is revoked
	return f
}

// close ends the fleet: cancel its context, close its connections, and
// wait for its streams' goroutines.
func (f *scaleFleet) close(cancel context.CancelFunc) {
	cancel()
	for _, g := range f.groups {
		for _, cc := range g.conns {
			cc.Close()
		}
	}
	f.wg.Wait()
}

func BenchmarkSignerScale(b *testing.B) {
	agents := envInt(b, "LANYARD_SCALE_AGENTS", 1000)
	tpms := min(envInt(b, "LANYARD_SCALE_TPMS", 100), agents)
	dir := b.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	eks := make([]string, tpms)
	for i := range eks {
		tpm, err := openSeeded(int64(i + 1))
		if err != nil {
			b.Fatal(err)
		}
		info, err := tpm.Info()
		if err != nil {
			b.Fatalf("Info: %v", err)
		}
		eks[i] = info.EKSHA256
		tpm.Close()
	}
	policyPath := filepath.Join(dir, "policy.hcl")
	if err := os.WriteFile(policyPath, []byte(scalePolicy(eks, 0)), 0o600); err != nil {
		b.Fatal(err)
	}
	writeScaleConfig(b, dir, swtpmtest.Start(b).Socket)
	sig := startScaleSigner(b, dir, "")
	rssIdle, _ := sig.usage(b)

	f := newScaleFleet(ctx, agents)
	defer f.close(cancel)
	var attests []time.Duration
	for t := range tpms {
		g := &scaleGroup{seed: int64(t + 1), ek: eks[t], from: t * agents / tpms, to: (t + 1) * agents / tpms}
		f.groups = append(f.groups, g)
		t0 := time.Now()
		firsts, err := f.connect(g, sig)
		if err != nil {
			b.Fatalf("agent %d: %v", t, err)
		}
		attests = append(attests, firsts[0].Sub(t0))
	}
	if _, err := f.w.wait(); err != nil {
		b.Fatalf("first sync: %v", err)
	}

	var lasts []time.Duration
	_, cpu0 := sig.usage(b)
	b.ResetTimer()
	for e := 1; e <= scaleEdits; e++ {
		if err := os.WriteFile(policyPath, []byte(scalePolicy(eks, e)), 0o600); err != nil {
			b.Fatal(err)
		}
		f.w.arm(scaleWorkloads+e, agents)
		t0 := time.Now()
		if err := sig.reload(); err != nil {
			b.Fatalf("edit %d: %v", e, err)
		}
		last, err := f.w.wait()
		if err != nil {
			b.Fatalf("edit %d: %v", e, err)
		}
		lasts = append(lasts, last.Sub(t0))
	}
	b.StopTimer()
	rss, cpu1 := sig.usage(b)

	sig, resync, resyncOwn := scaleRestart(b, dir, f, sig)
	tokenRevokes := scaleTokenRevoke(b, f, sig, agents)
	revokes := scaleRevoke(b, f, sig)

	slices.Sort(lasts)
	slices.Sort(attests)
	b.ReportMetric(float64(agents), "agents")
	b.ReportMetric(float64(tpms), "tpms")
	b.ReportMetric(scaleEdits, "edits")
	b.ReportMetric(msOf(attests[len(attests)/2]), "attest-ms")
	b.ReportMetric(msOf(lasts[len(lasts)/2]), "edit-last-p50-ms")
	b.ReportMetric(msOf(lasts[len(lasts)-1]), "edit-last-p99-ms")
	b.ReportMetric(rssIdle, "signer-rss-idle-mib")
	b.ReportMetric(rss, "signer-rss-mib")
	b.ReportMetric(msOf(cpu1-cpu0)/scaleEdits, "signer-cpu-ms/edit")
	b.ReportMetric(msOf(sig.started), "signer-start-ms")
	b.ReportMetric(msOf(percentile(resync, 50)), "resync-p50-ms")
	b.ReportMetric(msOf(percentile(resync, 99)), "resync-p99-ms")
	b.ReportMetric(msOf(percentile(resyncOwn, 50)), "resync-own-p50-ms")
	b.ReportMetric(msOf(percentile(resyncOwn, 99)), "resync-own-p99-ms")
	b.ReportMetric(float64(len(tokenRevokes)), "token-revokes")
	b.ReportMetric(msOf(percentile(tokenRevokes, 50)), "token-revoke-p50-ms")
	b.ReportMetric(msOf(percentile(tokenRevokes, 99)), "token-revoke-p99-ms")
	b.ReportMetric(float64(len(revokes)), "revokes")
	b.ReportMetric(msOf(percentile(revokes, 50)), "revoke-p50-ms")
	b.ReportMetric(msOf(percentile(revokes, 99)), "revoke-p99-ms")
}

// scaleRestart kills the signer with SIGKILL once every stream is open,
// starts it again on the same address and state dir (its keys sealed to
// the same swtpm), and returns, per stream, the time from the new signer
// serving to its first message again; the same from the moment its group
// had the simulator (the agents re-attest one after the other, as the
// simulator is one per process: a real fleet's TPMs work in parallel);
// and how long the signer took to start.
func scaleRestart(b *testing.B, dir string, f *scaleFleet, old *scaleSigner) (sig *scaleSigner, resync, own []time.Duration) {
	b.Helper()
	bundleBefore, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	if err != nil {
		b.Fatal(err)
	}
	agents := f.groups[len(f.groups)-1].to
	if err := old.kill(); err != nil {
		b.Fatal(err)
	}
	for range agents {
		select {
		case <-f.ends:
		case <-time.After(scaleTimeout):
			b.Fatalf("Sync streams still open %v after the signer was killed", scaleTimeout)
		}
	}
	f.w.arm(scaleWorkloads+scaleEdits, agents)
	type result struct {
		firsts []time.Time
		had    time.Time // the simulator was free for this group
		err    error
	}
	// The agents use old's address and trust: the new signer has the
	// same address and (checked below) the same bundle.
	results := make([]chan result, len(f.groups))
	for k, g := range f.groups {
		results[k] = make(chan result, 1)
		go func() {
			var r result
			r.firsts, r.err = f.reconnect(g, old)
			r.had = g.had
			results[k] <- r
		}()
	}
	sig = startScaleSigner(b, dir, old.addr)
	bundleAfter, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	if err != nil {
		b.Fatal(err)
	}
	if string(bundleAfter) != string(bundleBefore) {
		b.Fatal("the restarted signer's bundle differs: its keys did not survive the restart")
	}
	for k := range f.groups {
		r := <-results[k]
		if r.err != nil {
			b.Fatal(r.err)
		}
		from := sig.ready
		if r.had.After(from) {
			from = r.had
		}
		for _, at := range r.firsts {
			resync = append(resync, at.Sub(sig.ready))
			own = append(own, at.Sub(from))
		}
	}
	if _, err := f.w.wait(); err != nil {
		b.Fatalf("re-sync: %v", err)
	}
	return sig, resync, own
}

// scaleTokenRevokes is how many token revocations are timed.
const scaleTokenRevokes = 5

// scaleTokenRevoke revokes scaleTokenRevokes JWT-SVIDs by jti, one at a
// time, and returns for each the time until the last agent stream had
// it: an agent refuses the token from the moment its sync brings it.
func scaleTokenRevoke(b *testing.B, f *scaleFleet, sig *scaleSigner, streams int) []time.Duration {
	b.Helper()
	var out []time.Duration
	for k := 1; k <= scaleTokenRevokes; k++ {
		f.tw.arm(k, streams)
		t0 := time.Now()
		if err := sig.revokeToken(fmt.Sprintf("benchTokenID%d", k)); err != nil {
			b.Fatal(err)
		}
		last, err := f.tw.wait()
		if err != nil {
			b.Fatalf("token revocation %d: %v", k, err)
		}
		out = append(out, last.Sub(t0))
	}
	return out
}

// scaleRevoke revokes up to scaleRevokes agents, one at a time, with the
// Signer method the admin socket's revoke calls, and returns for each the
// time until the last of its streams ended with the revocation.
func scaleRevoke(b *testing.B, f *scaleFleet, sig *scaleSigner) []time.Duration {
	b.Helper()
	n := min(scaleRevokes, len(f.groups))
	var out []time.Duration
	for k := range n {
		g := f.groups[k*len(f.groups)/n]
		t0 := time.Now()
		if err := sig.revoke(g.ek); err != nil {
			b.Fatal(err)
		}
		var last time.Time
		for range g.to - g.from {
			select {
			case e := <-f.ends:
				if e.i < g.from || e.i >= g.to {
					b.Fatalf("stream %d ended (%v) when agent %s was revoked", e.i, e.err, g.ek)
				}
				if status.Code(e.err) != codes.PermissionDenied || !strings.Contains(e.err.Error(), "node revoked") {
					b.Fatalf("stream %d of the revoked agent ended with %v, want PermissionDenied: node revoked", e.i, e.err)
				}
				last = e.at
			case <-time.After(scaleTimeout):
				b.Fatalf("agent %s revoked: its Sync streams still open after %v", g.ek, scaleTimeout)
			}
		}
		out = append(out, last.Sub(t0))
	}
	return out
}

// percentile is the p-th percentile of ds (nearest rank), sorting ds.
func percentile(ds []time.Duration, p int) time.Duration {
	slices.Sort(ds)
	return ds[max(0, (len(ds)*p+99)/100-1)]
}
func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

package agent

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The agent's loops (attest, sync, renew) run here on fake time inside a
// synctest bubble, against fakeSigner: what took the wall clock end to
// end (e2e/rotation_test.go, e2e/recovery_test.go) is asserted here to
// the instant. Only the signer is fake; the upstream, the renewer and the
// cache are the real parts.

// loopAgent returns an agent whose upstream, renewer and JWT source run
// on f until the test ends. Jitter is none and backoff draws the top of
// its window, so the instants are the schedule's own.
func loopAgent(t *testing.T, f *fakeSigner) *Agent {
	t.Helper()
	a := New(&Config{TrustDomain: f.td, SignerAddresses: []string{"fake:1"}}, nil)
	a.started = time.Now()
	a.up.link, a.renew.signer, a.up.trust = f, f, x509bundle.New(f.td)
	a.up.rand, a.renew.rand = func() float64 { return 1 }, func() float64 { return 1 }
	a.up.jitter, a.renew.jitter = func() float64 { return 0 }, func() float64 { return 0 }
	runPart(t, a.up.Run)
	runPart(t, a.renew.Run)
	runPart(t, a.jwt.Run)
	return a
}

// sampler checks what the cache serves a caller, as a workload's
// X509Source sees it, and records every SVID serial.
type sampler struct {
	a       *Agent
	sel     []string
	serials []string
	issuers map[string]bool // by AuthorityKeyId
	bad     []string        // moments without a valid SVID that verifies
}

// sample looks once, now.
func (s *sampler) sample(t *testing.T) {
	t.Helper()
	now := time.Now()
	resp, _ := s.a.cache.X509SVIDResponse(s.sel)
	if resp == nil || len(resp.GetSvids()) == 0 {
		s.bad = append(s.bad, now.Format(time.StampMilli)+": no SVID")
		return
	}
	for _, sv := range resp.GetSvids() {
		chain, err := x509.ParseCertificates(sv.GetX509Svid())
		if err != nil {
			t.Fatal(err)
		}
		if !now.Before(chain[0].NotAfter) {
			s.bad = append(s.bad, now.Format(time.StampMilli)+": expired SVID served")
			continue
		}
		// What a peer holding the served bundle checks in a handshake:
		// across a CA rotation, every SVID must verify against it.
		cas, err := x509.ParseCertificates(sv.GetBundle())
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(s.a.cfg.TrustDomain, cas)); err != nil {
			s.bad = append(s.bad, now.Format(time.StampMilli)+": SVID does not verify against the served bundle: "+err.Error())
		}
		serial := chain[0].SerialNumber.Text(16)
		if !slices.Contains(s.serials, serial) {
			s.serials = append(s.serials, serial)
		}
		s.issuers[string(chain[0].AuthorityKeyId)] = true
	}
}

// run samples every 50 ms for d. Each sample waits for the agent's
// goroutines to have done what the instant asks of them (a timer that
// fires at an SVID's NotAfter and the sample share the instant).
func (s *sampler) run(t *testing.T, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		synctest.Wait()
		s.sample(t)
	}
}

// readyLoops starts an agent on a fake signer serving entries with
// SVIDs of ttl, waits until it is ready, and returns a sampler for the
// caller uid 1.
func readyLoops(t *testing.T, ttl time.Duration, entries ...*signerpb.Entry) (*fakeSigner, *Agent, *sampler) {
	t.Helper()
	f := newFakeSigner(t, ttl, entries...)
	a := loopAgent(t, f)
	waitReady(t, a, time.Second)
	return f, a, &sampler{a: a, sel: []string{"unix:uid:1"}, issuers: map[string]bool{}}
}

func waitReady(t *testing.T, a *Agent, within time.Duration) {
	t.Helper()
	select {
	case <-a.renew.Ready():
	case <-time.After(within):
		t.Fatalf("not ready within %v", within)
	}
}

// TestLoopsRotateShortLivedSVIDs (was e2e TestShortLivedSVIDsRotate's
// count of rotations): a 10 s SVID is renewed at its half-life, every
// time, and the caller always holds a valid one.
func TestLoopsRotateShortLivedSVIDs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, _, s := readyLoops(t, 10*time.Second, wireEntry("short", 1, "unix:uid:1"))
		s.run(t, 60*time.Second)
		if len(s.bad) > 0 {
			t.Errorf("%d moments without a valid SVID, first: %s", len(s.bad), s.bad[0])
		}
		// One new SVID every 5 s: the first, then 11 renewals (at 5 s,
		// 10 s, ..., 55 s) in 60 s.
		if len(s.serials) != 12 {
			t.Errorf("saw %d distinct SVIDs in 60 s, want 12 (renewed at each half-life)", len(s.serials))
		}
	})
}

// TestLoopsSignerOutageIsInvisible (was e2e TestSignerOutageIsInvisible
// and the unit half of TestSignerRestartResyncsAtOnce): with the signer
// down through a renewal point, the caller keeps a valid SVID; once the
// signer is back the renewal lands within seconds, and the sync stream is
// up again at once, not after the backoff the outage grew.
func TestLoopsSignerOutageIsInvisible(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, a, s := readyLoops(t, 30*time.Second, wireEntry("steady", 1, "unix:uid:1"))
		s.run(t, 10*time.Second)
		f.setDown(true)
		s.run(t, 12*time.Second) // past the renewal point at 15 s
		if r := a.Report(time.Now()); r.Health != Degraded || r.Signer.Connected || r.Signer.ConsecutiveFailures == 0 {
			t.Errorf("during the outage: health %s, connected %v, failures %d; want degraded, disconnected, failing",
				r.Health, r.Signer.Connected, r.Signer.ConsecutiveFailures)
		}
		f.setDown(false)
		back := time.Now()
		synctest.Wait()
		if !a.up.Snapshot().SyncConnected {
			t.Error("sync stream not up again the moment the signer is back")
		}
		s.run(t, 5*time.Second)
		if len(s.bad) > 0 {
			t.Errorf("the outage was visible: %d moments without a valid SVID, first: %s", len(s.bad), s.bad[0])
		}
		renewed := false
		for _, c := range f.calls() {
			renewed = renewed || (c.ok && !c.at.Before(back) && c.at.Sub(back) < 5*time.Second)
		}
		if !renewed || len(s.serials) != 2 {

			t.Errorf("renewed within 5 s of the signer's return: %v; SVIDs seen %d, want 2", renewed, len(s.serials))
		}
		if r := a.Report(time.Now()); r.Health != Healthy {
			t.Errorf("after the outage: health %s %q, want healthy", r.Health, r.Reasons)
		}
	})
}

// TestLoopsNeverServeExpiredSVID (was e2e TestNeverServesExpiredSVID):
// with the signer gone for good, the SVID is served until its NotAfter and
// never after; the caller is then pending (Unavailable, not
// PermissionDenied), and retries stay at the backoff floor, four a second.
func TestLoopsNeverServeExpiredSVID(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeSigner(t, 10*time.Second, wireEntry("brief", 1, "unix:uid:1"))
		a := loopAgent(t, f)
		waitReady(t, a, time.Second)
		sel := []string{"unix:uid:1"}
		resp, _ := a.cache.X509SVIDResponse(sel)
		leaf, _ := x509.ParseCertificate(resp.GetSvids()[0].GetX509Svid())
		f.setDown(true)
		var last time.Time
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			synctest.Wait() // the renewer's expiry timer shares the instant
			resp, _ := a.cache.X509SVIDResponse(sel)
			now := time.Now()
			if resp == nil {
				if now.Before(leaf.NotAfter) {
					t.Fatalf("nothing served at %v, before the SVID expired at %v", now, leaf.NotAfter)
				}
				if !a.cache.Pending(sel) {
					t.Fatal("caller not pending after expiry: it would be told PermissionDenied")
				}
				continue
			}
			c, _ := x509.ParseCertificates(resp.GetSvids()[0].GetX509Svid())
			if !now.Before(c[0].NotAfter) {
				t.Fatalf("served an SVID that expired at %v (now %v)", c[0].NotAfter, now)
			}
			last = now
		}
		if last.IsZero() || !last.Before(leaf.NotAfter) {
			t.Errorf("last served at %v, want before %v", last, leaf.NotAfter)
		}
		calls := f.calls()
		recent := 0
		for _, c := range calls {
			if time.Since(c.at) <= time.Second {
				recent++
			}
		}
		if recent > 5 {
			t.Errorf("%d signing attempts in the last second, want at most 4-5 (the backoff floor)", recent)
		}
	})
}

// TestRenewerBackoff: failed rounds are retried after the backoff's own
// delays, exactly (no SVID held: nothing to hurry for).
func TestRenewerBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeSigner(t, 10*time.Second)
		f.setDown(true)
		c := newCache(f.td.IDString())
		r := newRenewer(c, f, hclog.NewNullLogger(), newMetrics())
		r.rand, r.jitter = func() float64 { return 1 }, func() float64 { return 0 }
		runPart(t, r.Run)
		c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1")})
		r.wake()
		time.Sleep(time.Minute)
		calls := f.calls()
		var gaps []time.Duration
		for i := 1; i < len(calls); i++ {
			gaps = append(gaps, calls[i].at.Sub(calls[i-1].at))
		}
		var want []time.Duration
		var sum time.Duration
		for n := 1; sum+rotator.DefaultBackoff.Delay(n, 1) <= time.Minute; n++ {
			d := rotator.DefaultBackoff.Delay(n, 1)
			want = append(want, d)
			sum += d
		}
		if !slices.Equal(gaps, want) {
			t.Errorf("retry gaps %v, want %v", gaps, want)
		}
		if got := r.Snapshot().Failures; got != len(calls) {
			t.Errorf("Snapshot().Failures = %d, want %d", got, len(calls))
		}
		select {
		case <-r.Ready():
			t.Error("ready although no signing round reached the signer")
		default:
		}
	})
}

// TestRenewerReadyOnlyAfterSigning: the renewer is not ready while its
// rounds fail (the Workload API would listen with nothing to serve), and
// is as soon as one reaches the signer.
func TestRenewerReadyOnlyAfterSigning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeSigner(t, 10*time.Second)
		f.setDown(true)
		c := newCache(f.td.IDString())
		r := newRenewer(c, f, hclog.NewNullLogger(), newMetrics())
		r.rand = func() float64 { return 0 }
		runPart(t, r.Run)
		f.setEntries(wireEntry("a", 1, "unix:uid:1"))
		c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1")})
		r.wake()
		time.Sleep(5 * time.Second)
		select {
		case <-r.Ready():
			t.Fatal("ready after failed rounds only")
		default:
		}
		f.setDown(false)
		select {
		case <-r.Ready():
		case <-time.After(time.Second):
			t.Fatal("not ready within a second of the signer answering")
		}
		if resp, _ := c.X509SVIDResponse([]string{"unix:uid:1"}); resp == nil {
			t.Error("ready without the SVID")
		}
	})
}

// TestRenewerPacing: renewals of still-valid SVIDs that fall due together
// go out in rounds of renewBatch, a random pause below renewSpread apart.
func TestRenewerPacing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 2*renewBatch + 50
		var wire []*entry
		f := newFakeSigner(t, 10*time.Second)
		for i := range n {
			e := wireEntry("e"+itoa(i), 1, "unix:uid:1")
			f.entries = append(f.entries, e)
			wire = append(wire, testEntry("e"+itoa(i), 1, "unix:uid:1"))
		}
		c := newCache(f.td.IDString())
		r := newRenewer(c, f, hclog.NewNullLogger(), newMetrics())
		r.rand, r.jitter = func() float64 { return 0.5 }, func() float64 { return 0 }
		runPart(t, r.Run)
		c.setEntries(wire)
		r.wake()
		time.Sleep(7 * time.Second) // all due at 5 s
		calls := f.calls()
		var sizes []int
		for _, c := range calls {
			sizes = append(sizes, c.csrs)
		}
		// Missing SVIDs are never paced: all at once first.
		if want := []int{n, renewBatch, renewBatch, 50}; !slices.Equal(sizes, want) {
			t.Fatalf("batches %v, want %v", sizes, want)
		}
		for i := 2; i < len(calls); i++ {
			if gap := calls[i].at.Sub(calls[i-1].at); gap != renewSpread/2 {
				t.Errorf("round %d came %v after the previous, want %v (half of renewSpread)", i, gap, renewSpread/2)
			}
		}
	})
}

// TestUpstreamReattests: the agent SVID is renewed by attesting again at
// its half-life, and at once when the signer no longer knows the agent
// (it restarted); the sync stream then resumes on the new identity.
func TestUpstreamReattests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeSigner(t, time.Hour, wireEntry("svc", 1, "unix:uid:1"))
		f.agentTTL = 10 * time.Second
		a := loopAgent(t, f)
		waitReady(t, a, time.Second)
		time.Sleep(21 * time.Second)
		if got := f.attestCount(); got != 5 {
			t.Errorf("%d attestations in 21 s of a 10 s agent SVID, want 5 (one per half-life)", got)
		}
		before := f.attestCount()
		at := time.Now()
		f.forget()
		synctest.Wait()
		if got := f.attestCount(); got != before+1 || time.Since(at) != 0 {
			t.Errorf("after the signer forgot the agent: %d attestations (want %d) after %v", got, before+1, time.Since(at))
		}
		if !a.up.Snapshot().SyncConnected {
			t.Error("sync stream not resumed on the new identity")
		}
		if snap := a.up.Snapshot(); snap.EKSHA256 != "ab12" || snap.AgentID.Path() != agentPathPrefix+"ab12" {
			t.Errorf("snapshot EK %q, ID %s", snap.EKSHA256, snap.AgentID)
		}
	})
}

// TestLoopsAcrossCARotation (was e2e TestMTLSAcrossCARotation, the agent's
// half): the signer publishes its next CA before it signs with it; every
// SVID the agent serves, before and after the switch, verifies against
// the bundle it serves with it, which is what a peer's handshake checks.
func TestLoopsAcrossCARotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, _, s := readyLoops(t, 10*time.Second, wireEntry("server", 1, "unix:uid:1"), wireEntry("client", 1, "unix:uid:1"))
		s.run(t, 12*time.Second)
		f.rotateCA(t) // published
		s.run(t, 10*time.Second)
		f.activateCA() // signs
		s.run(t, 15*time.Second)
		if len(s.bad) > 0 {
			t.Errorf("%d bad moments across the CA rotation, first: %s", len(s.bad), s.bad[0])
		}
		if len(s.issuers) != 2 {
			t.Errorf("SVIDs came from %d CA(s), want both", len(s.issuers))
		}
	})
}

// TestJWTAcrossKeyRotation (was e2e TestJWTSourceAcrossKeyRotation, the
// agent's half): the signer publishes its next JWT key, then signs with
// it. Every token the agent hands out validates against the JWT bundle
// it serves (what a JWTSource and ValidateJWTSVID check), a token of the
// previous key still validates after the handover until it expires, and
// the next token after the old one's half-life comes from the new key.
func TestJWTAcrossKeyRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		td := spiffeid.RequireTrustDomainFromString("example.org")
		c := newCache(td.IDString())
		c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1")})
		m := newFakeMinter(t, time.Now)
		m.ttl, m.kid = 10*time.Second, "k1"
		j := newJWTSource(c, m.mint, hclog.NewNullLogger())
		runPart(t, j.Run)
		keys := map[string]*ecdsa.PrivateKey{"k1": m.key}
		publish := func(kids ...string) {
			t.Helper()
			var auth []*signerpb.JWTAuthority
			for _, kid := range kids {
				der, _ := x509.MarshalPKIXPublicKey(keys[kid].Public())
				auth = append(auth, &signerpb.JWTAuthority{KeyId: kid, PublicKey: der})
			}
			if _, err := c.setJWTBundle(td, auth); err != nil {
				t.Fatal(err)
			}
		}
		check := func(what, tok, wantKid string) {
			t.Helper()
			if _, err := jwtsvid.ParseAndValidate(tok, c.JWTBundles(nil), []string{"x"}); err != nil {
				t.Fatalf("%s: does not validate against the served JWT bundle: %v", what, err)
			}
			if kid := tokenKid(t, tok); kid != wantKid {
				t.Errorf("%s: signed by %q, want %q", what, kid, wantKid)
			}
		}
		publish("k1")
		old, err := fetch(t, j, "", "x")
		if err != nil {
			t.Fatal(err)
		}
		check("first token", old, "k1")

		k2, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		keys["k2"] = k2
		publish("k1", "k2") // published first
		m.key, m.kid = k2, "k2"
		time.Sleep(5 * time.Second) // the old token's half-life: minted anew
		tok, err := fetch(t, j, "", "x")
		if err != nil {
			t.Fatal(err)
		}
		check("token after the handover", tok, "k2")
		check("the previous key's unexpired token", old, "k1")

		time.Sleep(6 * time.Second) // the old token expired: k1 may go
		publish("k2")
		if _, err := jwtsvid.ParseAndValidate(old, c.JWTBundles(nil), []string{"x"}); err == nil {
			t.Error("an expired token of a retired key still validates")
		}
		tok, err = fetch(t, j, "", "x")
		if err != nil {
			t.Fatal(err)
		}
		check("token after k1 left", tok, "k2")
	})
}

// tokenKid reads a token's key ID from its JOSE header, which is not
// secret.
func tokenKid(t *testing.T, token string) string {
	t.Helper()
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Headers[0].KeyID
}

package agent

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"weak"

	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// testSVID makes an svid for entry id valid [nb, na), self-signed: the
// cache never verifies chains, it only serves them.
func testSVID(t *testing.T, id string, rev uint64, nb, na time.Time) *svid {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://example.org/" + id)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: nb, NotAfter: na, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(key)
	return &svid{key: entryKey{id, rev}, chain: []*x509.Certificate{cert}, keyPKCS8: pkcs8, received: nb}
}

func testEntry(id string, rev uint64, selectors ...string) *entry {
	return &entry{ID: id, SPIFFEID: spiffeid.RequireFromString("spiffe://example.org/" + id), Selectors: selectors, Revision: rev}
}

func TestCacheDue(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	sched := rotator.Schedule{} // no jitter: renew exactly at half-life
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{
		testEntry("fresh", 1, "unix:uid:1"), testEntry("old-rev", 2, "unix:uid:1"),
		testEntry("due", 1, "unix:uid:1"), testEntry("none", 1, "unix:uid:1"),
	})
	c.putSVIDs([]*svid{
		testSVID(t, "fresh", 1, t0, t0.Add(time.Hour)),                 // renews at t0+30m
		testSVID(t, "old-rev", 1, t0, t0.Add(time.Hour)),               // entry changed since
		testSVID(t, "due", 1, t0.Add(-time.Hour), t0.Add(time.Minute)), // past half-life
	})
	missing, renew, next := c.due(t0, sched)
	if got := ids(missing); got != "old-rev none" {
		t.Errorf("missing = %q, want %q", got, "old-rev none")
	}
	if got := ids(renew); got != "due" {
		t.Errorf("renew = %q, want due", got)
	}
	// The earliest event is "due" expiring at t0+1m (it is renewing, so
	// the loop must wake to drop it if renewal fails).
	if want := t0.Add(time.Minute); !next.Equal(want) {
		t.Errorf("next = %v, want %v", next, want)
	}
}

func ids(es []*entry) string {
	s := ""
	for i, e := range es {
		if i > 0 {
			s += " "
		}
		s += e.ID
	}
	return s
}

func TestCacheNeverServesExpired(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1"), testEntry("b", 1, "unix:uid:1")})
	c.putSVIDs([]*svid{
		testSVID(t, "a", 1, t0.Add(-time.Minute), t0.Add(time.Second)),
		testSVID(t, "b", 1, t0.Add(-time.Minute), t0.Add(time.Hour)),
	})
	resp, changed := c.X509SVIDResponse([]string{"unix:uid:1"})
	if len(resp.GetSvids()) != 2 {
		t.Fatalf("served %d SVIDs, want 2", len(resp.GetSvids()))
	}
	if n := c.expire(t0.Add(time.Second)); n != 1 {
		t.Fatalf("expire removed %d, want 1", n)
	}
	select {
	case <-changed:
	default:
		t.Fatal("expiry did not wake streams")
	}
	resp, _ = c.X509SVIDResponse([]string{"unix:uid:1"})
	if len(resp.GetSvids()) != 1 || resp.GetSvids()[0].GetSpiffeId() != "spiffe://example.org/b" {
		t.Fatalf("after expiry served %v, want only b", resp.GetSvids())
	}
	c.expire(t0.Add(2 * time.Hour))
	if resp, _ := c.X509SVIDResponse([]string{"unix:uid:1"}); resp != nil {
		t.Fatalf("served %v with every SVID expired, want nothing", resp.GetSvids())
	}
}

func TestCacheSharesResponses(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1"), testEntry("b", 1, "unix:uid:2")})
	c.putSVIDs([]*svid{testSVID(t, "a", 1, t0, t0.Add(time.Hour)), testSVID(t, "b", 1, t0, t0.Add(time.Hour))})

	r1, _ := c.X509SVIDResponse([]string{"unix:gid:5", "unix:uid:1"})
	r2, _ := c.X509SVIDResponse([]string{"unix:uid:1", "unix:user:x"})
	if r1 == nil || r1 != r2 {
		t.Fatal("two callers entitled to the same SVIDs got separately built responses")
	}
	rb, _ := c.X509SVIDResponse([]string{"unix:uid:2"})

	// Rotating b must rebuild b's response and keep a's.
	c.putSVIDs([]*svid{testSVID(t, "b", 1, t0, t0.Add(time.Hour))})
	if r3, _ := c.X509SVIDResponse([]string{"unix:uid:1"}); r3 != r1 {
		t.Error("rotating b rebuilt a's response")
	}
	if rb2, _ := c.X509SVIDResponse([]string{"unix:uid:2"}); rb2 == rb {
		t.Error("rotating b kept b's stale response")
	}
}

func TestMatches(t *testing.T) {
	have := []string{"unix:gid:0", "unix:path:/bin/x", "unix:uid:0"}
	tests := []struct {
		name     string
		required []string
		want     bool
	}{
		{"all present", []string{"unix:uid:0", "unix:path:/bin/x"}, true},
		{"one missing", []string{"unix:uid:0", "unix:path:/bin/y"}, false},
		{"no selectors never match", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := matches(tt.required, have); got != tt.want {
				t.Errorf("matches(%v) = %v, want %v", tt.required, got, tt.want)
			}
		})
	}
}

// TestBundlesKeyedBySPIFFEID: the Workload API spec keys bundle maps by
// the trust domain's SPIFFE ID, which clients in every language look up.
func TestBundlesKeyedBySPIFFEID(t *testing.T) {
	c := newCache("spiffe://example.org")
	if resp, _ := c.X509BundlesResponse(); len(resp.GetBundles()) != 0 {
		t.Fatalf("bundles before any CA: %v", resp.GetBundles())
	}
	ca := testSVID(t, "ca", 1, time.Now(), time.Now().Add(time.Hour)).chain[0]
	c.setBundle([]*x509.Certificate{ca})
	resp, _ := c.X509BundlesResponse()
	if got := resp.GetBundles()["spiffe://example.org"]; !bytes.Equal(got, ca.Raw) || len(resp.GetBundles()) != 1 {
		t.Errorf("X.509 bundles = %v, want only spiffe://example.org with the CA", resp.GetBundles())
	}
}

// TestCacheRemembersMatchesUntilTheyChange checks that the per-selector
// memo of matches never serves a stale answer: each step changes what a
// caller with uid 1 matches, and it must see the change at once.
func TestCacheRemembersMatchesUntilTheyChange(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	caller := []string{"unix:gid:5", "unix:uid:1"}
	steps := []struct {
		name   string
		change func()
		want   []string // SPIFFE IDs served, in policy order
	}{
		{"entries without SVIDs", func() {
			c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1"), testEntry("b", 1, "unix:gid:5"), testEntry("c", 1, "unix:uid:2")})
		}, nil},
		{"first SVID arrives", func() { c.putSVIDs([]*svid{testSVID(t, "b", 1, t0, t0.Add(time.Hour))}) }, []string{"b"}},
		{"second SVID arrives", func() { c.putSVIDs([]*svid{testSVID(t, "a", 1, t0, t0.Add(time.Hour))}) }, []string{"a", "b"}},
		{"SVID of another caller's entry", func() { c.putSVIDs([]*svid{testSVID(t, "c", 1, t0, t0.Add(time.Hour))}) }, []string{"a", "b"}},
		{"rotation keeps the match", func() { c.putSVIDs([]*svid{testSVID(t, "a", 1, t0, t0.Add(2*time.Hour))}) }, []string{"a", "b"}},
		{"entry now asks for more", func() {
			c.setEntries([]*entry{testEntry("a", 2, "unix:uid:1", "unix:user:x"), testEntry("b", 1, "unix:gid:5"), testEntry("c", 1, "unix:uid:2")})
		}, []string{"b"}},
		{"SVID expires", func() { c.expire(t0.Add(time.Hour)) }, nil},
	}
	for _, st := range steps {
		st.change()
		// Twice: the first call fills the memo, the second reads it.
		for _, pass := range []string{"first", "second"} {
			resp, _ := c.X509SVIDResponse(caller)
			var got []string
			for _, s := range resp.GetSvids() {
				got = append(got, strings.TrimPrefix(s.GetSpiffeId(), "spiffe://example.org/"))
			}
			if !slices.Equal(got, st.want) {
				t.Errorf("%s, %s call: served %q, want %q", st.name, pass, got, st.want)
			}
		}
	}
}

// TestCachePolicyEditNeverRelabels: entry
// "root" (unix:uid:0) is edited to a new SPIFFE ID and selector
// unix:uid:65534. The SVID signed for the old revision must never reach the
// newly entitled caller, under either label; the new caller waits until the
// SVID of the new revision arrives.
func TestCachePolicyEditNeverRelabels(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	root := testEntry("root", 1, "unix:uid:0")
	c.setEntries([]*entry{root})
	old := testSVID(t, "root", 1, t0, t0.Add(time.Hour))
	c.putSVIDs([]*svid{old})
	nobody := []string{"unix:uid:65534"}
	if resp, _ := c.X509SVIDResponse(nobody); resp != nil {
		t.Fatalf("uid 65534 served %v before the edit", resp.GetSvids())
	}
	oldKey := weak.Make(&old.keyPKCS8[0])
	old = nil

	edited := &entry{ID: "root", SPIFFEID: spiffeid.RequireFromString("spiffe://example.org/nobody"), Selectors: nobody, Revision: 2}
	c.setEntries([]*entry{edited})
	if resp, _ := c.X509SVIDResponse(nobody); resp != nil {
		t.Fatalf("after the edit uid 65534 was served %v, signed for the old revision", resp.GetSvids())
	}
	if !c.Pending(nobody) {
		t.Error("Pending = false for the newly entitled caller while its SVID is being signed")
	}
	if c.Pending([]string{"unix:uid:0"}) {
		t.Error("Pending = true for uid 0, which the edit no longer entitles")
	}
	runtime.GC()
	if oldKey.Value() != nil {
		t.Error("the old revision's private key is still held after the edit")
	}

	// An SVID signed for revision 1 while the edit was syncing arrives late.
	if stale := c.putSVIDs([]*svid{testSVID(t, "root", 1, t0, t0.Add(time.Hour))}); stale != 1 {
		t.Errorf("putSVIDs of an old-revision SVID: stale = %d, want 1", stale)
	}
	if resp, _ := c.X509SVIDResponse(nobody); resp != nil {
		t.Fatalf("late old-revision SVID served: %v", resp.GetSvids())
	}

	_, changed := c.X509SVIDResponse(nobody)
	fresh := testSVID(t, "nobody", 2, t0, t0.Add(time.Hour)) // its URI is .../nobody
	fresh.key = entryKey{"root", 2}
	c.putSVIDs([]*svid{fresh})
	select {
	case <-changed:
	default:
		t.Fatal("the new revision's SVID did not wake the waiting stream")
	}
	resp, _ := c.X509SVIDResponse(nobody)
	if len(resp.GetSvids()) != 1 {
		t.Fatalf("served %d SVIDs after the new one was signed, want 1", len(resp.GetSvids()))
	}
	got := resp.GetSvids()[0]
	cert, err := x509.ParseCertificate(got.GetX509Svid())
	if err != nil {
		t.Fatal(err)
	}
	if got.GetSpiffeId() != "spiffe://example.org/nobody" || cert.URIs[0].String() != got.GetSpiffeId() {
		t.Errorf("served label %s for a certificate of %s", got.GetSpiffeId(), cert.URIs[0])
	}
	if c.Pending(nobody) {
		t.Error("Pending = true once the SVID is held")
	}
}

// TestCacheLabelIsCertificateID: even if an entry's SPIFFE ID and the
// certificate held for it disagreed, the response carries the certificate's.
func TestCacheLabelIsCertificateID(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{{ID: "a", SPIFFEID: spiffeid.RequireFromString("spiffe://example.org/label"), Selectors: []string{"unix:uid:1"}, Revision: 1}})
	c.putSVIDs([]*svid{testSVID(t, "a", 1, t0, t0.Add(time.Hour))})
	resp, _ := c.X509SVIDResponse([]string{"unix:uid:1"})
	if got := resp.GetSvids()[0].GetSpiffeId(); got != "spiffe://example.org/a" {
		t.Errorf("label = %s, want the certificate's spiffe://example.org/a", got)
	}
}

// TestCacheHoldsValidSVID is what the Workload API's health service
// reports: SERVING only while some SVID held is valid.
func TestCacheHoldsValidSVID(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1")})
	if c.holdsValidSVID(t0) {
		t.Error("holds a valid SVID before any was signed")
	}
	c.putSVIDs([]*svid{testSVID(t, "a", 1, t0, t0.Add(time.Minute))})
	if !c.holdsValidSVID(t0) {
		t.Error("holds no valid SVID with one valid for a minute")
	}
	if c.holdsValidSVID(t0.Add(time.Minute)) {
		t.Error("an SVID at its NotAfter still counts as valid")
	}
}

// TestCacheResyncWithoutChangeWakesNoStream: a sync that brings the same
// entries again (a reconnection, a move to another signer replica) must
// not wake the workload streams, which would all re-send; a changed
// revision, an added or a removed entry must.
func TestCacheResyncWithoutChangeWakesNoStream(t *testing.T) {
	c := newCache("example.org")
	c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1"), testEntry("b", 1, "unix:uid:1")})
	woken := func(f func()) bool {
		c.mu.Lock()
		ch := c.changed.C()
		c.mu.Unlock()
		f()
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
	if woken(func() { c.setEntries([]*entry{testEntry("a", 1, "unix:uid:1"), testEntry("b", 1, "unix:uid:1")}) }) {
		t.Error("the same entries again woke the streams")
	}
	for _, tc := range []struct {
		name    string
		entries []*entry
	}{
		{"revision changed", []*entry{testEntry("a", 2, "unix:uid:1"), testEntry("b", 1, "unix:uid:1")}},
		{"entry removed", []*entry{testEntry("a", 2, "unix:uid:1")}},
		{"entry added", []*entry{testEntry("a", 2, "unix:uid:1"), testEntry("c", 1, "unix:uid:1")}},
	} {
		if !woken(func() { c.setEntries(tc.entries) }) {
			t.Errorf("%s: streams not woken", tc.name)
		}
	}
}

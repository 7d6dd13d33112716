package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var errRefused = status.Error(codes.Unavailable, "connection refused")

// testReplicas is a replica set over addrs whose names resolve through
// names (a name not in it does not resolve) and whose draws come from a
// seeded source.
func testReplicas(t *testing.T, addrs []string, names map[string][]string) *replicaSet {
	t.Helper()
	r := newReplicaSet(addrs, nil)
	r.resolve = func(_ context.Context, host string) ([]string, error) {
		if net.ParseIP(host) != nil {
			t.Errorf("resolver asked for IP literal %s", host)
		}
		if ips, ok := names[host]; ok {
			return ips, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	r.rand = rand.New(rand.NewPCG(1, 2)).IntN
	return r
}

// TestReplicaChoiceSpreads: fresh agents choose at random, so a fleet
// spreads over the replicas.
func TestReplicaChoiceSpreads(t *testing.T) {
	addrs := []string{"10.0.1.1:8443", "10.0.1.2:8443", "10.0.1.3:8443"}
	src := rand.New(rand.NewPCG(7, 7))
	chosen := map[string]int{}
	const agents = 30
	for range agents {
		r := testReplicas(t, addrs, nil)
		r.rand = src.IntN
		c, ok := r.choose(t.Context(), time.Now(), nil)
		if !ok {
			t.Fatal("nothing chosen")
		}
		chosen[c.addr]++
	}
	if len(chosen) != len(addrs) {
		t.Errorf("%d fresh agents chose %v, want every replica chosen", agents, chosen)
	}
}

// TestReplicaChoice: the replica in use is kept while it answers; one
// that failed is passed over for a few seconds while another can serve.
func TestReplicaChoice(t *testing.T) {
	const a, b, c = "10.0.1.1:8443", "10.0.1.2:8443", "10.0.1.3:8443"
	now := time.Now()
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	tests := []struct {
		name     string
		addrs    []string
		inUse    string
		failed   map[string]time.Time
		tried    []string
		want     []string // any of these; none means nothing is chosen
		wantNone bool
	}{
		{name: "the one in use stays", addrs: []string{a, b, c}, inUse: b, want: []string{b}},
		{name: "in use failed: another", addrs: []string{a, b, c}, inUse: a, failed: map[string]time.Time{a: ago(time.Second)}, want: []string{b, c}},
		{name: "recently failed ones are skipped", addrs: []string{a, b, c}, inUse: a,
			failed: map[string]time.Time{a: ago(time.Second), b: ago(2 * time.Second)}, want: []string{c}},
		{name: "a failure long ago counts no more", addrs: []string{a, b, c}, inUse: a,
			failed: map[string]time.Time{a: ago(time.Second), b: ago(time.Second), c: ago(replicaQuarantine)}, want: []string{c}},
		{name: "tried in this attestation: skipped", addrs: []string{a, b, c}, tried: []string{a, b}, want: []string{c}},
		{name: "all failed: the oldest failure", addrs: []string{a, b, c},
			failed: map[string]time.Time{a: ago(time.Second), b: ago(3 * time.Second), c: ago(2 * time.Second)}, want: []string{b}},
		{name: "all failed, one tried: wait", addrs: []string{a, b, c}, tried: []string{a},
			failed: map[string]time.Time{a: ago(0), b: ago(time.Second), c: ago(time.Second)}, wantNone: true},
		{name: "all tried", addrs: []string{a, b}, tried: []string{a, b}, wantNone: true},
		{name: "single signer that failed: itself", addrs: []string{a}, inUse: a, failed: map[string]time.Time{a: ago(0)}, want: []string{a}},
		{name: "nothing configured", wantNone: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testReplicas(t, tt.addrs, nil)
			if tt.inUse != "" {
				r.use(replica{addr: tt.inUse, authority: tt.inUse})
			}
			for addr, at := range tt.failed {
				r.failed(addr, errRefused, at)
			}
			for range 10 { // the draw must never leave the allowed set
				got, ok := r.choose(t.Context(), now, tt.tried)
				if tt.wantNone {
					if ok {
						t.Fatalf("choose = %s, want none", got.addr)
					}
					return
				}
				if !ok || !slices.Contains(tt.want, got.addr) {
					t.Fatalf("choose = %q, %v; want one of %v", got.addr, ok, tt.want)
				}
			}
		})
	}
}

// TestReplicaResolve: at a selection every configured name is resolved;
// a name with several addresses counts as all of them, dialled by IP
// with the name kept as the TLS server name; a name with one address, or
// none in time, is dialled by name as with a single signer.
func TestReplicaResolve(t *testing.T) {
	names := map[string][]string{
		"signers.test": {"127.0.0.1", "127.0.0.2", "127.0.0.1"},
		"one.test":     {"127.0.0.9"},
		"v6.test":      {"::1", "127.0.0.1"},
	}
	tests := []struct {
		name  string
		addrs []string
		want  []replica
	}{
		{"a name with several addresses", []string{"signers.test:8443"}, []replica{
			{addr: "127.0.0.1:8443", authority: "signers.test:8443"}, {addr: "127.0.0.2:8443", authority: "signers.test:8443"}}},
		{"IPv6 and IPv4", []string{"v6.test:1"}, []replica{{addr: "[::1]:1", authority: "v6.test:1"}, {addr: "127.0.0.1:1", authority: "v6.test:1"}}},
		{"a name with one address", []string{"one.test:8443"}, []replica{{addr: "one.test:8443", authority: "one.test:8443"}}},
		{"a name that does not resolve", []string{"gone.test:8443"}, []replica{{addr: "gone.test:8443", authority: "gone.test:8443"}}},
		{"IP literals and a name, duplicates once", []string{"127.0.0.2:8443", "signers.test:8443", "[::1]:8443"}, []replica{
			{addr: "127.0.0.2:8443", authority: "127.0.0.2:8443"}, {addr: "127.0.0.1:8443", authority: "signers.test:8443"},
			{addr: "[::1]:8443", authority: "[::1]:8443"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testReplicas(t, tt.addrs, names)
			got := r.refresh(t.Context())
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(replica{})); diff != "" {
				t.Errorf("candidates (-want +got):\n%s", diff)
			}
			if _, ok := r.choose(t.Context(), time.Now(), nil); !ok {
				t.Error("nothing chosen")
			}
			if want := len(tt.want) > 1; r.several() != want {
				t.Errorf("several() = %v, want %v", r.several(), want)
			}
		})
	}
}

// TestReplicaResolveBounded: a name standing for very many addresses
// gives at most maxCandidates candidates.
func TestReplicaResolveBounded(t *testing.T) {
	var ips []string
	for i := range 300 {
		ips = append(ips, fmt.Sprintf("10.0.%d.%d", i/250, i%250+1))
	}
	r := testReplicas(t, []string{"many.test:1"}, map[string][]string{"many.test": ips})
	if got := len(r.refresh(t.Context())); got != maxCandidates {
		t.Errorf("%d candidates, want %d", got, maxCandidates)
	}
}

// TestReplicaLost: only an unreachable replica makes the agent switch,
// and only when another can serve; a refusal is the tier's answer.
func TestReplicaLost(t *testing.T) {
	const a, b = "10.0.1.1:8443", "10.0.1.2:8443"
	tests := []struct {
		name       string
		addrs      []string
		inUse      string
		err        error
		want       bool
		wantMarked bool
	}{
		{"broken stream, another replica", []string{a, b}, a, fmt.Errorf("sync: %w", errRefused), true, true},
		{"replica shutting down", []string{a, b}, a, status.Error(codes.Unavailable, "sync: the signer is shutting down"), true, true},
		{"no connection in time", []string{a, b}, a, fmt.Errorf("signer %s: %w within 10s: %w", a, errNoConnection, context.Canceled), true, true},
		{"deadline", []string{a, b}, a, status.Error(codes.DeadlineExceeded, "deadline exceeded"), true, true},
		{"revoked", []string{a, b}, a, status.Error(codes.PermissionDenied, "node revoked: stolen"), false, false},
		{"not attested with this replica", []string{a, b}, a, status.Error(codes.Unauthenticated, "attest again"), false, false},
		{"not a gRPC error", []string{a, b}, a, errors.New("boom"), false, false},
		{"single signer", []string{a}, a, errRefused, false, true},
		{"nothing in use yet", []string{a, b}, "", errRefused, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testReplicas(t, tt.addrs, nil)
			if tt.inUse != "" {
				r.use(replica{addr: tt.inUse, authority: tt.inUse})
			}
			now := time.Now()
			if got := r.lost(tt.err, now); got != tt.want {
				t.Errorf("lost(%v) = %v, want %v", tt.err, got, tt.want)
			}
			marked := len(r.snapshot(now).Unreachable) > 0
			if marked != tt.wantMarked {
				t.Errorf("in use marked unreachable = %v, want %v", marked, tt.wantMarked)
			}
		})
	}
}

// TestReplicaSnapshot: status names the replica in use and the ones not
// reached recently, oldest first; a replica reached again, or whose
// failure is old, is not listed.
func TestReplicaSnapshot(t *testing.T) {
	const a, b, c = "10.0.1.1:8443", "10.0.1.2:8443", "10.0.1.3:8443"
	now := time.Now()
	r := testReplicas(t, []string{a, b, c}, nil)
	if got := r.snapshot(now).Address; got != a {
		t.Errorf("address before any choice = %q, want the first configured", got)
	}
	r.failed(c, errors.New("c down"), now.Add(-2*time.Second))
	r.failed(a, errors.New("a down"), now.Add(-3*time.Second))
	r.failed(b, errors.New("b down"), now.Add(-replicaShown))
	r.use(replica{addr: b, authority: b})
	want := replicaSnapshot{
		Address: b, Configured: []string{a, b, c}, Candidates: []string{a, b, c},
		Unreachable: []UnreachableReport{
			{Address: a, Error: "a down", At: now.Add(-3 * time.Second)},
			{Address: c, Error: "c down", At: now.Add(-2 * time.Second)},
		},
	}
	if diff := cmp.Diff(want, r.snapshot(now)); diff != "" {
		t.Errorf("snapshot (-want +got):\n%s", diff)
	}
	r.lost(errRefused, now)
	r.reached()
	if diff := cmp.Diff(want, r.snapshot(now)); diff != "" {
		t.Errorf("after the replica in use was reached again (-want +got):\n%s", diff)
	}
}

package agent

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// replicaQuarantine is how long a replica that could not be reached
	// is passed over while another can be chosen: long enough that a
	// switch does not bounce back to the replica just killed, short
	// enough that a restarted one is used again soon.
	replicaQuarantine = 5 * time.Second
	// replicaShown is how long status lists a replica the agent could not
	// reach (unless it was reached again since).
	replicaShown = 10 * time.Minute
	// resolveTimeout bounds resolving the configured host names at one
	// selection: a switch must take well under a second, and a name that
	// does not resolve in time is dialled by name (gRPC resolves it).
	resolveTimeout = 500 * time.Millisecond
	// maxCandidates bounds the candidate list (names that resolve to
	// many addresses).
	maxCandidates = 64
	// replicaConnectTimeout bounds the connection attempt of an
	// attestation when another replica could be tried instead: a replica
	// that is down but does not refuse (its host is gone) must not hold
	// the switch up for gRPC's 20 s.
	replicaConnectTimeout = 2 * time.Second
)

// errNoSignerAddress is returned by an attestation when the config names
// no signer (tests that never attest).
var errNoSignerAddress = errors.New("no signer address configured")

// errNoConnection says the connection to the signer did not come up in
// time: the replica is unreachable.
var errNoConnection = errors.New("no connection")

// resolveFunc returns the IP addresses of host. net.DefaultResolver's
// LookupHost is the real one; tests answer for made-up names.
type resolveFunc func(ctx context.Context, host string) ([]string, error)

// replica is one signer the agent can attest with.
type replica struct {
	addr string // what is dialled: ip:port, or host:port as configured
	// authority is the configured host:port: the TLS server name and
	// :authority stay what they were when the name itself was dialled
	// (the signer is verified by its SPIFFE ID, not by name).
	authority string
}

// replicaFailure is why and when a replica could not be reached.
type replicaFailure struct {
	err string
	at  time.Time
}

// replicaSet is the signer replicas of one trust domain the agent can
// use, and which one it uses. Replicas share one bundle, but each serves
// Sync and signing only to agents that attested with it: so the agent
// attests with one, chosen at random (a fleet spreads over the tier),
// uses it for everything, and when it becomes unreachable attests with
// another at once. Which replica to use is the set's decision; noticing
// that the one in use is gone is the upstream's (lost) and the signer
// connection's (failed).
type replicaSet struct {
	configured []string // host:port, as in signer_address
	resolve    resolveFunc
	rand       func(n int) int // in [0, n)
	log        hclog.Logger

	mu         sync.Mutex
	candidates []replica // as of the last selection
	inUse      replica   // attested with; zero before the first attestation
	trying     replica   // the last one chosen
	failures   map[string]replicaFailure
}

func newReplicaSet(addrs []string, log hclog.Logger) *replicaSet {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	r := &replicaSet{
		configured: slices.Clone(addrs),
		resolve:    net.DefaultResolver.LookupHost,
		rand:       rand.IntN,
		log:        log,
		failures:   map[string]replicaFailure{},
	}
	for _, a := range addrs {
		r.candidates = append(r.candidates, replica{addr: a, authority: a})
	}
	return r
}

// several reports whether more than one replica is known: only then is
// there another to switch to.
func (r *replicaSet) several() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.candidates) > 1
}

// choose returns the replica the next attestation goes to, passing over
// those in tried (they failed during this attestation). The replica in
// use stays while it has not failed; else the configured names are
// resolved again and a replica is drawn at random among those that did
// not fail within replicaQuarantine. When all did, the one that failed
// longest ago is tried, but only as the first try of an attestation: the
// caller then waits out its backoff. ok is false when nothing is left
// worth trying now.
func (r *replicaSet) choose(ctx context.Context, now time.Time, tried []string) (replica, bool) {
	r.mu.Lock()
	if in := r.inUse; in.addr != "" && !slices.Contains(tried, in.addr) && !r.quarantinedLocked(in.addr, now) {
		r.trying = in
		r.mu.Unlock()
		return in, true
	}
	r.mu.Unlock()
	cands := r.refresh(ctx)
	r.mu.Lock()
	defer r.mu.Unlock()
	var fresh, stale []replica
	for _, c := range cands {
		switch {
		case slices.Contains(tried, c.addr):
		case r.quarantinedLocked(c.addr, now):
			stale = append(stale, c)
		default:
			fresh = append(fresh, c)
		}
	}
	var pick replica
	switch {
	case len(fresh) > 0:
		pick = fresh[r.rand(len(fresh))]
	case len(tried) == 0 && len(stale) > 0:
		pick = slices.MinFunc(stale, func(a, b replica) int { return r.failures[a.addr].at.Compare(r.failures[b.addr].at) })
	default:
		return replica{}, false
	}
	r.trying = pick
	return pick, true
}

func (r *replicaSet) quarantinedLocked(addr string, now time.Time) bool {
	f, ok := r.failures[addr]
	return ok && now.Sub(f.at) < replicaQuarantine
}

// refresh resolves the configured addresses into the candidate list: an
// IP literal is itself; a name with several addresses counts as all of
// them; a name with one, or one that does not resolve in time, is dialled
// by name, as with a single signer.
func (r *replicaSet) refresh(ctx context.Context) []replica {
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	var out []replica
	for _, hp := range r.configured {
		for _, c := range r.expand(ctx, hp) {
			if len(out) < maxCandidates && !slices.ContainsFunc(out, func(o replica) bool { return o.addr == c.addr }) {
				out = append(out, c)
			}
		}
	}
	r.mu.Lock()
	r.candidates = out
	for addr, f := range r.failures {
		// Bounds the map when names resolve to ever new addresses.
		if time.Since(f.at) >= replicaShown {
			delete(r.failures, addr)
		}
	}
	r.mu.Unlock()
	return out
}

func (r *replicaSet) expand(ctx context.Context, hp string) []replica {
	self := []replica{{addr: hp, authority: hp}}
	host, port, err := net.SplitHostPort(hp)
	if err != nil || net.ParseIP(host) != nil {
		return self
	}
	ips, err := r.resolve(ctx, host)
	if err != nil {
		r.log.Warn("cannot resolve signer address; dialling it by name", "address", hp, "error", err)
		return self
	}
	if len(ips) <= 1 {
		return self
	}
	out := make([]replica, 0, len(ips))
	for _, ip := range ips {
		out = append(out, replica{addr: net.JoinHostPort(ip, port), authority: hp})
	}
	return out
}

// use records a successful attestation with c: it is the replica in use.
func (r *replicaSet) use(c replica) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inUse = c
	delete(r.failures, c.addr)
}

// failed records that addr could not be reached.
func (r *replicaSet) failed(addr string, err error, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures[addr] = replicaFailure{err: err.Error(), at: now}
}

// reached records that the replica in use answered (a sync message).
func (r *replicaSet) reached() {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.failures, r.inUse.addr)
}

// lost notes that the connection to the replica in use broke with err,
// and reports whether the agent should attest with another replica now:
// err says the replica is unreachable, and another one has not failed
// recently. A refusal (PermissionDenied: revoked, policy) is not a reason
// to switch: it is the tier's answer, and every replica would give it.
func (r *replicaSet) lost(err error, now time.Time) bool {
	if !unreachable(err) {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.inUse.addr == "" {
		return false
	}
	r.failures[r.inUse.addr] = replicaFailure{err: err.Error(), at: now}
	return slices.ContainsFunc(r.candidates, func(c replica) bool {
		return c.addr != r.inUse.addr && !r.quarantinedLocked(c.addr, now)
	})
}

// address is the replica in use, else the one being tried, else the
// first configured: what logs and status name as "the signer".
func (r *replicaSet) address() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addressLocked()
}

func (r *replicaSet) addressLocked() string {
	switch {
	case r.inUse.addr != "":
		return r.inUse.addr
	case r.trying.addr != "":
		return r.trying.addr
	case len(r.configured) > 0:
		return r.configured[0]
	}
	return ""
}

// replicaSnapshot is the replica set's state for the status report.
type replicaSnapshot struct {
	Address     string   // as address()
	Configured  []string // signer_address
	Candidates  []string // as of the last selection
	Unreachable []UnreachableReport
}

// snapshot returns the set's state at now; Unreachable lists, oldest
// first, the replicas that failed within replicaShown and were not
// reached since.
func (r *replicaSet) snapshot(now time.Time) replicaSnapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := replicaSnapshot{Address: r.addressLocked(), Configured: slices.Clone(r.configured)}
	for _, c := range r.candidates {
		s.Candidates = append(s.Candidates, c.addr)
	}
	for addr, f := range r.failures {
		if now.Sub(f.at) < replicaShown {
			s.Unreachable = append(s.Unreachable, UnreachableReport{Address: addr, Error: f.err, At: f.at})
		}
	}
	slices.SortFunc(s.Unreachable, func(a, b UnreachableReport) int { return a.At.Compare(b.At) })
	return s
}

// unreachable reports whether err says the replica could not be reached
// or stopped answering, so another may serve: gRPC's Unavailable (refused
// or broken connection, a replica shutting down) or DeadlineExceeded, or
// a connection that did not come up in time.
func unreachable(err error) bool {
	if errors.Is(err, errNoConnection) {
		return true
	}
	var gs interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &gs) {
		return false
	}
	switch gs.GRPCStatus().Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return false
}

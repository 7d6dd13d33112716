//go:build cgo

package signer_test

// BenchmarkSignerTier: issue 14's signer tier measured. A real three-member
// etcd cluster runs in the benchmark process (internal/etcdtest) and three
// signer replicas, r0 to r2, each its own child process (as in
// BenchmarkSignerScale), share their state in it. Simulated agents hold
// real mTLS Sync streams, agent group k on replica k%3 (an agent syncs
// with the replica it attested with). Then:
//
//   - policy applies through r0 (Signer.ApplyPolicy, what `lanyard-signer
//     policy apply` calls) are timed until the last stream on every
//     replica has the new entries: etcd write, each replica's watch, push;
//   - a quiet window of tierQuiet with every agent connected, a tenth of
//     them re-attesting as agent_ttl renewals would, counts etcd's writes
//     (its revision, and a watch on the prefix that names what was
//     written);
//   - r2 is killed with SIGKILL and each of its agents attests with r0 or
//     r1 (alternately) and reopens its streams, as the real agent does
//     when it loses its replica; timed from the kill.
//
// Agents are simulated as in BenchmarkSignerScale: LANYARD_TIER_TPMS
// distinct simulator TPMs (agent identities), LANYARD_TIER_AGENTS Sync
// streams spread over them. The simulator is one per process, so agents
// attest one after the other: re-sync figures counted from the kill hold
// that queue; the "own" ones count from when the agent's TPM was free.
// The replicas keep their keys in memory (key_storage "memory"): r1 and r2
// join a tier whose CA is published and wait ca_publish_lead (1 s here).

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/etcdtest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	// tierReplicas is how many signer replicas run.
	tierReplicas = 3
	// tierQuiet is the window over which etcd's writes are counted.
	tierQuiet = 10 * time.Second
	// tierPrefix is the replicas' etcd prefix.
	tierPrefix = "/lanyard/example.org"
)

// BenchmarkSignerTier: see the file comment. Metrics:
//
//	agents, tpms, replicas          Sync streams, distinct TPMs (agent IDs) behind them, signer replicas
//	applies                         policy applies timed
//	apply-p50-ms, -p99-ms           apply through r0 until the last stream on every replica has it
//	replica-cpu-ms/apply            signer user+sys CPU per apply, the busiest replica (10 ms ticks)
//	replica-rss-mib                 signer RSS holding its streams, the largest replica
//	reattests                       agents that attested again during the quiet window
//	replica-cpu-ms/attest           CPU of the replica serving one re-attestation with its agent's streams reopened
//	etcd-writes/s                   etcd revisions over the quiet window, per second
//	moved                           Sync streams of the killed replica
//	kill-resync-p50-ms, -p99-ms     SIGKILL of r2 until each of its streams has its first message on r0 or r1
//	kill-resync-own-p50-ms, -p99-ms the same from the moment its TPM's simulator was free
//	kill-etcd-writes                etcd writes from the kill until etcd is quiet again (the moved agents' registry records)
func BenchmarkSignerTier(b *testing.B) {
	agents := envInt(b, "LANYARD_TIER_AGENTS", 1000)
	tpms := min(envInt(b, "LANYARD_TIER_TPMS", 99), agents)
	dir := b.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	eks := fleetEKs(b, tpms)
	etcd := etcdtest.Start(b, 3)
	reps := startTier(b, dir, etcd, eks)

	f := newScaleFleet(ctx, agents)
	defer f.close(cancel)
	on := make([]int, tpms) // group k's replica
	for k := range tpms {
		g := &scaleGroup{seed: int64(k + 1), ek: eks[k], from: k * agents / tpms, to: (k + 1) * agents / tpms}
		f.groups = append(f.groups, g)
		on[k] = k % tierReplicas
		if _, err := f.connect(g, reps[on[k]]); err != nil {
			b.Fatalf("agent %d on r%d: %v", k, on[k], err)
		}
	}
	if _, err := f.w.wait(); err != nil {
		b.Fatalf("first sync: %v", err)
	}

	b.ResetTimer()
	applies, cpuApply := tierApplies(b, dir, f, reps, eks)
	b.StopTimer()
	var rss float64
	for _, r := range reps {
		m, _ := r.usage(b)
		rss = max(rss, m)
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatalf("etcd client: %v", err)
	}
	defer cli.Close()
	q := tierQuietWindow(b, ctx, cli, f, reps, on)
	moved, resync, own, killWrites := tierKill(b, ctx, cli, f, reps, on)

	b.ReportMetric(float64(agents), "agents")
	b.ReportMetric(float64(tpms), "tpms")
	b.ReportMetric(tierReplicas, "replicas")
	b.ReportMetric(float64(len(applies)), "applies")
	b.ReportMetric(msOf(percentile(applies, 50)), "apply-p50-ms")
	b.ReportMetric(msOf(percentile(applies, 99)), "apply-p99-ms")
	b.ReportMetric(cpuApply, "replica-cpu-ms/apply")
	b.ReportMetric(rss, "replica-rss-mib")
	b.ReportMetric(float64(q.reattests), "reattests")
	b.ReportMetric(q.cpuPerAttest, "replica-cpu-ms/attest")
	b.ReportMetric(q.writesPerSecond, "etcd-writes/s")
	b.ReportMetric(float64(moved), "moved")
	b.ReportMetric(msOf(percentile(resync, 50)), "kill-resync-p50-ms")
	b.ReportMetric(msOf(percentile(resync, 99)), "kill-resync-p99-ms")
	b.ReportMetric(msOf(percentile(own, 50)), "kill-resync-own-p50-ms")
	b.ReportMetric(msOf(percentile(own, 99)), "kill-resync-own-p99-ms")
	b.ReportMetric(float64(killWrites), "kill-etcd-writes")
}

// fleetEKs is the EK hash of each simulated TPM, seeds 1 to n.
func fleetEKs(b *testing.B, n int) []string {
	b.Helper()
	eks := make([]string, n)
	for i := range eks {
		tpm, err := openSeeded(int64(i + 1))
		if err != nil {
			b.Fatal(err)
		}
		info, err := tpm.Info()
		tpm.Close()
		if err != nil {
			b.Fatalf("Info: %v", err)
		}
		eks[i] = info.EKSHA256
	}
	return eks
}

// startTier starts the replicas one after the other, each in dir/rN: r0
// seeds etcd's policy from its policy_path and signs at once, the others
// join and serve ca_publish_lead later. It returns once every replica
// serves and every bundle_path holds every replica's CA, with each
// replica's trust set to that union: an agent moving to another replica
// trusts it already, as a real agent does with any replica's bundle_path.
func startTier(b *testing.B, dir string, etcd *etcdtest.Cluster, eks []string) []*scaleSigner {
	b.Helper()
	reps := make([]*scaleSigner, tierReplicas)
	for i := range reps {
		rdir := filepath.Join(dir, fmt.Sprintf("r%d", i))
		if err := os.MkdirAll(rdir, 0o700); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(rdir, "policy.hcl"), []byte(scalePolicy(eks, 0)), 0o600); err != nil {
			b.Fatal(err)
		}
		addr := freeLoopbackAddr(b)
		conf := "trust_domain = \"example.org\"\npolicy_path = \"policy.hcl\"\nbundle_path = \"bundle.pem\"\nstate_dir = \"state\"\nlog_level = \"error\"\n" +
			"admin_socket_path = \"admin/admin.sock\"\nkey_storage = \"memory\"\nca_ttl = \"1h\"\nca_publish_lead = \"1s\"\n" +
			fmt.Sprintf("listen_address = %q\nreplica_name = \"r%d\"\n", addr, i) +
			fmt.Sprintf("etcd {\n  endpoints = [\"%s\"]\n  prefix = %q\n}\n", strings.Join(etcd.Endpoints(), `", "`), tierPrefix) +
			// Many streams share each TPM's agent ID (see BenchmarkSignerScale).
			"limits {\n  max_sync_streams_per_agent = 1048576\n}\n"
		if err := os.WriteFile(filepath.Join(rdir, "signer.hcl"), []byte(conf), 0o600); err != nil {
			b.Fatal(err)
		}
		reps[i] = startScaleSigner(b, rdir, addr)
	}
	deadline := time.Now().Add(scaleTimeout)
	for i, r := range reps {
		path := filepath.Join(dir, fmt.Sprintf("r%d", i), "bundle.pem")
		for {
			bundle, err := x509bundle.Load(scaleTD, path)
			if err == nil && len(bundle.X509Authorities()) == tierReplicas {
				r.trust = bundle
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("r%d's bundle_path lacks the other replicas' CAs after %v (%v)", i, scaleTimeout, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return reps
}

// freeLoopbackAddr reserves a loopback port for a replica's listen_address
// (what it publishes in etcd) and releases it for the child to bind.
func freeLoopbackAddr(b *testing.B) string {
	b.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// tierApplies applies scaleEdits policies through r0, each with one more
// workload for the node every agent is in, and returns for each the time
// until the last stream on every replica had it, and the CPU per apply of
// the busiest replica in ms.
func tierApplies(b *testing.B, dir string, f *scaleFleet, reps []*scaleSigner, eks []string) ([]time.Duration, float64) {
	b.Helper()
	agents := f.groups[len(f.groups)-1].to
	cpu0 := make([]time.Duration, len(reps))
	for i, r := range reps {
		_, cpu0[i] = r.usage(b)
	}
	var lasts []time.Duration
	for e := 1; e <= scaleEdits; e++ {
		path := filepath.Join(dir, fmt.Sprintf("apply-%d.hcl", e))
		if err := os.WriteFile(path, []byte(scalePolicy(eks, e)), 0o600); err != nil {
			b.Fatal(err)
		}
		f.w.arm(scaleWorkloads+e, agents)
		t0 := time.Now()
		if err := reps[0].command("apply " + path); err != nil {
			b.Fatalf("apply %d: %v", e, err)
		}
		last, err := f.w.wait()
		if err != nil {
			b.Fatalf("apply %d: %v", e, err)
		}
		lasts = append(lasts, last.Sub(t0))
	}
	var cpu float64
	for i, r := range reps {
		_, c := r.usage(b)
		b.Logf("r%d: %.1f ms CPU per apply", i, msOf(c-cpu0[i])/scaleEdits)
		cpu = max(cpu, msOf(c-cpu0[i])/scaleEdits)
	}
	return lasts, cpu
}

// tierQuietResult is what the quiet window measured.
type tierQuietResult struct {
	reattests       int
	cpuPerAttest    float64 // ms, the replica serving it
	writesPerSecond float64
}

// tierQuietWindow waits until etcd is quiet, then for tierQuiet has a
// tenth of the agents attest again, spread over the window, each with
// its own replica and reopening its streams, as agent_ttl renewals do;
// and counts etcd's writes meanwhile: each bumps the revision by one,
// and a watch on the prefix names the keys (logged by kind).
func tierQuietWindow(b *testing.B, ctx context.Context, cli *clientv3.Client, f *scaleFleet, reps []*scaleSigner, on []int) tierQuietResult {
	b.Helper()
	rev0 := settledRevision(b, ctx, cli)
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	w := watchWrites(wctx, cli, rev0)
	cpu0 := make([]time.Duration, len(reps))
	for i, r := range reps {
		_, cpu0[i] = r.usage(b)
	}
	n := max(1, len(f.groups)/10)
	var renewals time.Duration // CPU of the replica serving each, during it
	start := time.Now()
	for j := range n {
		// Pacing, not synchronisation: renewals spread over the window.
		time.Sleep(time.Until(start.Add(tierQuiet * time.Duration(j) / time.Duration(n))))
		k := j * len(f.groups) / n
		_, c0 := reps[on[k]].usage(b)
		if _, err := f.connect(f.groups[k], reps[on[k]]); err != nil {
			b.Fatalf("renewal of agent %d on r%d: %v", k, on[k], err)
		}
		_, c1 := reps[on[k]].usage(b)
		renewals += c1 - c0
	}
	time.Sleep(time.Until(start.Add(tierQuiet)))
	elapsed := time.Since(start)
	rev1 := etcdRevision(b, ctx, cli)
	var cpu time.Duration
	for i, r := range reps {
		_, c := r.usage(b)
		cpu += c - cpu0[i]
	}
	byKind := w.until(rev1)
	b.Logf("etcd over %v of quiet: %d writes (revision %d to %d); by key: %v", elapsed.Round(time.Millisecond), rev1-rev0, rev0, rev1, byKind)
	b.Logf("replicas' CPU over the window: %v, of which %v serving the %d renewals", cpu, renewals, n)
	return tierQuietResult{
		reattests:       n,
		cpuPerAttest:    msOf(renewals) / float64(n),
		writesPerSecond: float64(rev1-rev0) / elapsed.Seconds(),
	}
}

// etcdRevision is etcd's current revision.
func etcdRevision(b *testing.B, ctx context.Context, cli *clientv3.Client) int64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, tierPrefix+"/policy", clientv3.WithCountOnly())
	if err != nil {
		b.Fatalf("etcd revision: %v", err)
	}
	return resp.Header.Revision
}

// settledRevision returns etcd's revision once it has not moved for a
// second (the agents' first attestations and moves are written by then),
// polling every 100 ms for at most scaleTimeout.
func settledRevision(b *testing.B, ctx context.Context, cli *clientv3.Client) int64 {
	b.Helper()
	const still = 10 // polls
	deadline := time.Now().Add(scaleTimeout)
	rev, same := etcdRevision(b, ctx, cli), 0
	for same < still {
		if time.Now().After(deadline) {
			b.Fatalf("etcd still written to after %v (revision %d)", scaleTimeout, rev)
		}
		time.Sleep(100 * time.Millisecond)
		r := etcdRevision(b, ctx, cli)
		if r == rev {
			same++
		} else {
			rev, same = r, 0
		}
	}
	return rev
}

// writeWatch counts the writes under the prefix after a revision, by the
// key's first segment ("nodes", "replicas", "alive", ...) and event type.
type writeWatch struct {
	mu     sync.Mutex
	byKind map[string]int
	seen   int64 // highest mod revision counted
	done   chan struct{}
}

func watchWrites(ctx context.Context, cli *clientv3.Client, after int64) *writeWatch {
	w := &writeWatch{byKind: make(map[string]int), seen: after, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for resp := range cli.Watch(ctx, tierPrefix+"/", clientv3.WithPrefix(), clientv3.WithRev(after+1)) {
			w.mu.Lock()
			for _, ev := range resp.Events {
				kind, _, _ := strings.Cut(strings.TrimPrefix(string(ev.Kv.Key), tierPrefix+"/"), "/")
				w.byKind[kind+" "+strings.ToLower(ev.Type.String())]++
				w.seen = max(w.seen, ev.Kv.ModRevision)
			}
			w.mu.Unlock()
		}
	}()
	return w
}

// until returns the counts once the watch has seen revision rev (or 5 s
// passed: a write outside the prefix is never seen), and ends the watch.
func (w *writeWatch) until(rev int64) map[string]int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		w.mu.Lock()
		seen := w.seen
		w.mu.Unlock()
		if seen >= rev || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.byKind)
}

// tierKill kills the last replica with SIGKILL; each of its agents, once
// its streams ended, attests with r0 or r1 (alternately) and reopens them
// there, as the real agent does when it loses its replica. It returns how
// many streams moved and, per stream, the time from the kill to its first
// message on the new replica, and the same from when its TPM was free;
// and how many etcd writes the fail-over made (until etcd is quiet again).
func tierKill(b *testing.B, ctx context.Context, cli *clientv3.Client, f *scaleFleet, reps []*scaleSigner, on []int) (moved int, resync, own []time.Duration, writes int64) {
	b.Helper()
	rev0 := etcdRevision(b, ctx, cli)
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	w := watchWrites(wctx, cli, rev0)
	victim := len(reps) - 1
	var groups int
	for k, r := range on {
		if r == victim {
			groups++
			moved += f.groups[k].to - f.groups[k].from
		}
	}
	// Every stream that moves must get the policy in force.
	f.w.arm(scaleWorkloads+scaleEdits, moved)
	type result struct {
		firsts []time.Time
		had    time.Time
		err    error
	}
	results := make(chan result, groups)
	ended := make(map[int]int)
	launched := 0
	killAt := time.Now()
	if err := reps[victim].kill(); err != nil {
		b.Fatal(err)
	}
	// The agents attest one after the other (one simulator): about a
	// second each is plenty.
	bound := scaleTimeout + time.Duration(groups)*time.Second
	timeout := time.After(bound)
	for got := 0; got < groups; {
		select {
		case e := <-f.ends:
			k := slices.IndexFunc(f.groups, func(g *scaleGroup) bool { return e.i >= g.from && e.i < g.to })
			if on[k] != victim {
				b.Fatalf("stream %d on r%d ended (%v) when r%d was killed", e.i, on[k], e.err, victim)
			}
			g := f.groups[k]
			if ended[k]++; ended[k] < g.to-g.from {
				continue
			}
			to := launched % 2
			launched++
			on[k] = to
			go func() {
				firsts, err := f.connect(g, reps[to])
				results <- result{firsts, g.had, err}
			}()
		case r := <-results:
			if r.err != nil {
				b.Fatalf("agent leaving r%d: %v", victim, r.err)
			}
			for _, at := range r.firsts {
				resync = append(resync, at.Sub(killAt))
				own = append(own, at.Sub(r.had))
			}
			got++
		case <-timeout:
			b.Fatalf("r%d killed: %d of %d agents re-synced elsewhere after %v", victim, got, groups, bound)
		}
	}
	if _, err := f.w.wait(); err != nil {
		b.Fatalf("streams moved off r%d: %v", victim, err)
	}
	rev1 := settledRevision(b, ctx, cli)
	b.Logf("etcd writes of the fail-over: %d; by key: %v", rev1-rev0, w.until(rev1))
	return moved, resync, own, rev1 - rev0
}

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// suiteConfig is what "lanyard-bench suite" needs: the binaries, a running
// TPM the agent may use, and what to measure.
type suiteConfig struct {
	AgentBin, SignerBin string
	TPMSocket, EKCA     string // the swtpm socket and the CA its EK certificate chains to
	Dir                 string // work directory for configs, sockets and logs
	Calls               int    // sequential one-shot calls
	Clients             []int  // concurrent client counts
	Duration            time.Duration
	MaxCalls            int   // per concurrent run
	Streams             []int // open-stream levels for fan-out and RSS
	Rotations           int   // rotations measured per level
	Starts              int   // agent starts measured
	Entries             int   // workload entries in the "many entries" phase
	GoBench             []string
	AgentLogLevel       string // the agent's log_level; "" leaves its default (info)
	AttestFlood         int    // Attest streams sending nothing, on one connection to a lone signer; 0 skips
}

// suite runs every figure against real processes and returns the rows.
// It starts and stops the signer and agent itself, twice: once with one
// workload entry, once with cfg.Entries, because the signer reads its
// policy at start.
func suite(cfg suiteConfig) ([]row, error) {
	var rows []row
	uid := os.Getuid()
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	w := &suiteRun{cfg: cfg, port: port, uid: uid}
	// The agent holds a socket and a pidfd per connection, and this
	// process the other end: both need room for the largest level.
	if _, err := raiseNoFile(uint64(2*slices.Max(append(cfg.Streams, 0)) + 1024)); err != nil {
		return nil, err
	}

	// Phase 1: one entry with a long TTL, so no rotation disturbs the
	// one-shot figures.
	if err := w.startSigner("one", policyFor(cfg.EKCA, uid, 1, "1h")); err != nil {
		return nil, err
	}
	var starts, reported []time.Duration
	for i := range cfg.Starts {
		t0 := time.Now()
		if err := w.startAgent(fmt.Sprintf("agent-start%d", i)); err != nil {
			w.stopAll()
			return nil, err
		}
		d, err := firstSVID(w.socket(), w.agent, t0, 30*time.Second)
		if err != nil {
			w.stopAll()
			return nil, err
		}
		starts = append(starts, d)
		if r, ok := w.agent.reportedStartup(); ok {
			reported = append(reported, r)
		}
		if i < cfg.Starts-1 {
			w.agent.stop()
		}
	}
	rows = append(rows,
		durationRow("agent start to first SVID (swtpm attestation included)", starts, "fresh process, polled every 5 ms"),
		durationRow("agent's own startup_ms log (start to listening)", reported, `"agent ready" line`))
	rss, err := settledRSS(w.agent.pid())
	if err != nil {
		w.stopAll()
		return nil, err
	}
	rows = append(rows, singleRow("agent RSS idle, 1 entry", "MiB", 1, rss, "VmRSS"))

	oneRows, err := w.oneShots()
	if err == nil {
		// With the agent's default limits, unlike phase 2's.
		var fr row
		if fr, err = floodRow(w.socket(), w.agent.pid()); err == nil {
			oneRows = append(oneRows, fr)
		}
	}
	w.stopAll()
	if err != nil {
		return nil, err
	}
	rows = append(rows, oneRows...)

	// Phase 2: cfg.Entries entries; the first, the one this process gets,
	// lives 10 s so the agent renews it about every 5 s.
	if err := w.startSigner("many", policyFor(cfg.EKCA, uid, cfg.Entries, "10s")); err != nil {
		return nil, err
	}
	defer w.stopAll()
	// The fan-out opens up to max(Streams) streams from this one uid, as
	// many workloads would from many: raise the per-uid caps past it.
	w.extraAgentConf = fmt.Sprintf("limits {\n  max_connections_per_uid = %[1]d\n  max_streams_per_uid = %[1]d\n}\n", slices.Max(append(cfg.Streams, 0))+1024)
	if err := w.startAgent("agent-many"); err != nil {
		return nil, err
	}
	if _, err := firstSVID(w.socket(), w.agent, time.Now(), 30*time.Second); err != nil {
		return nil, err
	}
	base, err := settledRSS(w.agent.pid())
	if err != nil {
		return nil, err
	}
	rows = append(rows, singleRow(fmt.Sprintf("agent RSS idle, %d entries", cfg.Entries), "MiB", 1, base, "VmRSS"))
	fanRows, err := w.fanout(base)
	rows = append(rows, fanRows...)
	if err != nil {
		return rows, err
	}
	if cfg.AttestFlood > 0 {
		floodRows, err := w.floodPhase(cfg.AttestFlood) // phase 3: the signer alone (attestflood.go)
		rows = append(rows, floodRows...)
		if err != nil {
			return rows, err
		}
	}
	for _, path := range cfg.GoBench {
		gb, err := goBenchRows(path)
		if err != nil {
			return rows, err
		}
		rows = append(rows, gb...)
	}
	return rows, nil
}

type suiteRun struct {
	cfg           suiteConfig
	port, uid     int
	signer, agent *daemon
	// extraAgentConf is appended to the agent's config (phase 2's limits).
	extraAgentConf string
}

func (w *suiteRun) socket() string { return filepath.Join(w.cfg.Dir, "workload.sock") }

// logPath is where a daemon's log goes: a folder of its own, not the one
// holding bundle.pem. The agent watches the bundle's folder, so a log
// written beside it would wake the agent on every audit line it writes,
// a cost no deployment has (its logs go to the journal).
func (w *suiteRun) logPath(name string) (string, error) {
	dir := filepath.Join(w.cfg.Dir, "logs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	return filepath.Join(dir, name+".log"), nil
}

func (w *suiteRun) stopAll() {
	w.agent.stop()
	w.signer.stop()
	w.agent, w.signer = nil, nil
}

func (w *suiteRun) startSigner(name, policy string) error {
	dir := w.cfg.Dir
	bundle := filepath.Join(dir, "bundle.pem")
	_ = os.Remove(bundle)
	conf := fmt.Sprintf("trust_domain = \"example.org\"\nlisten_address = \"127.0.0.1:%d\"\npolicy_path = \"policy.hcl\"\nbundle_path = \"bundle.pem\"\nstate_dir = %q\nlog_level = \"warn\"\n",
		w.port, filepath.Join(dir, "signer-state-"+name))
	if err := os.WriteFile(filepath.Join(dir, "signer.hcl"), []byte(conf), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "policy.hcl"), []byte(policy), 0o644); err != nil {
		return err
	}
	logPath, err := w.logPath("signer-" + name)
	if err != nil {
		return err
	}
	d, err := startDaemon("signer", w.cfg.SignerBin, filepath.Join(dir, "signer.hcl"), logPath)
	if err != nil {
		return err
	}
	w.signer = d
	return waitFile(bundle, d, 30*time.Second)
}

func (w *suiteRun) startAgent(name string) error {
	dir := w.cfg.Dir
	conf := fmt.Sprintf("trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:%d\"\ntrust_bundle_path = \"bundle.pem\"\nsocket_path = %q\nadmin_socket_path = %q\ntpm { socket = %q }\n",
		w.port, w.socket(), filepath.Join(dir, "admin.sock"), w.cfg.TPMSocket)
	if w.cfg.AgentLogLevel != "" {
		conf += fmt.Sprintf("log_level = %q\n", w.cfg.AgentLogLevel)
	}
	conf += w.extraAgentConf
	if err := os.WriteFile(filepath.Join(dir, "agent.hcl"), []byte(conf), 0o644); err != nil {
		return err
	}
	logPath, err := w.logPath(name)
	if err != nil {
		return err
	}
	d, err := startDaemon("agent", w.cfg.AgentBin, filepath.Join(dir, "agent.hcl"), logPath)
	if err != nil {
		return err
	}
	w.agent = d
	return nil
}

// oneShots measures sequential and concurrent one-shot calls against the
// agent, then against a floor serving the agent's own response.
func (w *suiteRun) oneShots() ([]row, error) { return w.oneShotsOn(w.socket()) }

func (w *suiteRun) oneShotsOn(socket string) ([]row, error) {
	ctx := context.Background()
	resp, err := oneShot(ctx, socket)
	if err != nil {
		return nil, fmt.Errorf("capture a response: %w", err)
	}
	floor, err := startFloor(w.cfg.Dir, resp)
	if err != nil {
		return nil, err
	}
	defer floor.stop()
	// Warm both up: the first calls pay for lazy initialisation.
	if _, err := sequential(ctx, socket, 20); err != nil {
		return nil, fmt.Errorf("agent warm-up: %w", err)
	}
	if _, err := sequential(ctx, floor.socket, 20); err != nil {
		return nil, fmt.Errorf("floor warm-up: %w", err)
	}
	agentSeq, floorSeq, err := sequentialPair(ctx, socket, floor.socket, w.cfg.Calls)
	if err != nil {
		return nil, fmt.Errorf("one-shot: %w", err)
	}
	r := durationRow("one-shot FetchX509SVID, sequential", agentSeq, "dial, attest, first response, hang up; calls alternate with the floor's")
	fr := durationRow("", floorSeq, "")
	r.Floor, r.FloorP99 = fr.Median, fr.P99
	rows := []row{r}
	for _, c := range w.cfg.Clients {
		a, f, err := concurrentPair(ctx, socket, floor.socket, c, w.cfg.Duration, w.cfg.MaxCalls)
		if err != nil {
			return rows, err
		}
		rate := singleRow(fmt.Sprintf("one-shot calls/s, %d clients", c), "calls/s", a.calls, a.perSecond(), fmt.Sprintf("%v in all, in halves alternating with the floor", a.elapsed.Round(10*time.Millisecond)))
		rate.Floor = f.perSecond()
		lat := durationRow(fmt.Sprintf("one-shot latency, %d clients", c), a.latencies, "")
		lat.Floor = durationRow("", f.latencies, "").Median
		rows = append(rows, rate, lat)
	}
	return rows, nil
}

// fanout opens each level of streams in turn, measures the agent's RSS and
// then the spread of the next rotations over every stream.
func (w *suiteRun) fanout(base float64) ([]row, error) {
	return w.fanoutOn(w.socket(), w.agent.pid(), base)
}

// fanoutOn is fanout against any agent; pid 0 skips RSS, base 0 skips the
// per-1,000 figure.
func (w *suiteRun) fanoutOn(socket string, pid int, base float64) ([]row, error) {
	set := newStreamSet(socket)
	defer set.close()
	limit, err := hardNoFile()
	if err != nil {
		return nil, err
	}
	var rows []row
	for _, n := range w.cfg.Streams {
		perConn := perConnection(n, limit)
		if err := set.grow(n, perConn, 2*time.Minute); err != nil {
			return rows, fmt.Errorf("open %d streams: %w", n, err)
		}
		layout := "one stream per connection"
		if perConn > 1 {
			layout = fmt.Sprintf("new streams %d per connection: RLIMIT_NOFILE %d, the agent holds a socket and a pidfd per connection", perConn, limit)
		}
		if pid != 0 {
			rss, err := settledRSS(pid)
			if err != nil {
				return rows, err
			}
			rows = append(rows, singleRow(fmt.Sprintf("agent RSS with %d open streams", n), "MiB", 1, rss, layout))
			if base > 0 {
				per := (rss - base) / (float64(n) / 1000)
				rows = append(rows, singleRow(fmt.Sprintf("agent RSS added per 1,000 streams (at %d)", n), "MiB", 1, per, "over the idle figure above"))
			}
		}
		spreads, err := set.rotations(w.cfg.Rotations, 30*time.Second)
		rows = append(rows, durationRow(fmt.Sprintf("rotation reaches %d streams", n), spreads, "first stream to last stream, per rotation"))
		if err != nil {
			return rows, err
		}
	}
	return rows, nil
}

// policyFor is a policy accepting the swtpm's EK by its CA, with entries
// workloads: the first matches this process by uid and lives ttl; the
// others ask also for a systemd unit this process is not in, so the agent
// holds their SVIDs but this process gets one SVID.
func policyFor(ekCA string, uid, entries int, ttl string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node \"bench\" {\n  ek_ca = [%q]\n}\n", ekCA)
	fmt.Fprintf(&b, "workload \"bench\" {\n  spiffe_id = \"spiffe://example.org/bench\"\n  nodes = [\"bench\"]\n  selectors = [\"unix:uid:%d\"]\n  x509_ttl = %q\n}\n", uid, ttl)
	for i := 1; i < entries; i++ {
		fmt.Fprintf(&b, "workload \"filler-%d\" {\n  spiffe_id = \"spiffe://example.org/filler/%d\"\n  nodes = [\"bench\"]\n  selectors = [\"unix:uid:%d\", \"systemd:unit:filler-%d.service\"]\n  x509_ttl = \"1h\"\n}\n", i, i, uid, i)
	}
	return b.String()
}

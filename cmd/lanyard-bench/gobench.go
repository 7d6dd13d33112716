package main

import (
	"bufio"
	"fmt"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// goBenchLine is one result line of `go test -bench` output.
type goBenchLine struct {
	name    string // without the -GOMAXPROCS suffix
	n       int
	metrics map[string]float64 // by unit
}

var procsSuffix = regexp.MustCompile(`-\d+$`)

// parseGoBench reads the result lines of `go test -bench` output.
func parseGoBench(path string) ([]goBenchLine, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read go bench output: %w", err)
	}
	defer f.Close()
	var out []goBenchLine
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
			continue
		}
		n, err := strconv.Atoi(fields[1])
		if err != nil {
			continue
		}
		l := goBenchLine{name: procsSuffix.ReplaceAllString(fields[0], ""), n: n, metrics: make(map[string]float64)}
		for i := 2; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				break
			}
			l.metrics[fields[i+1]] = v
		}
		out = append(out, l)
	}
	return out, sc.Err()
}

// goBenchRows turns `go test -bench` output into rows: per benchmark its
// time per operation and, in the note, operations per second per core
// (the benchmarks run one goroutine, -cpu 1); the signer scale run's own
// metrics become rows of their own.
func goBenchRows(path string) ([]row, error) {
	lines, err := parseGoBench(path)
	if err != nil {
		return nil, err
	}
	var rows []row
	for _, l := range lines {
		if l.name == "BenchmarkSignerScale" {
			rows = append(rows, scaleRows(l)...)
			continue
		}
		if l.name == "BenchmarkSignerTier" {
			rows = append(rows, tierRows(l)...)
			continue
		}
		ns, ok := l.metrics["ns/op"]
		if !ok || ns == 0 {
			continue
		}
		rows = append(rows, singleRow(l.name, "µs/op", l.n, ns/1000, fmt.Sprintf("%.0f/s per core", 1e9/ns)))
	}
	return rows, nil
}

// metric is l's figure in unit, NaN when absent.
func (l goBenchLine) metric(unit string) float64 {
	if v, ok := l.metrics[unit]; ok {
		return v
	}
	return math.NaN()
}

// scaleRows names the figures of BenchmarkSignerScale.
func scaleRows(l goBenchLine) []row {
	m := l.metric
	agents, tpms := int(m("agents")), int(m("tpms"))
	edits := int(m("edits"))
	edit := singleRow(fmt.Sprintf("signer: policy edit reaches %d agents' Sync streams", agents), "ms", edits, m("edit-last-p50-ms"),
		fmt.Sprintf("edit to last stream; %d distinct TPMs, signer in its own process", tpms))
	edit.P99 = m("edit-last-p99-ms")
	resync := singleRow(fmt.Sprintf("signer: restart to %d agents re-synced", agents), "ms", agents, m("resync-p50-ms"),
		"kill -9, start on the same state dir and swtpm: serving to each stream's first message; agents re-attest one at a time (one simulator)")
	resync.P99 = m("resync-p99-ms")
	own := singleRow("signer: restart, one agent's re-sync once its TPM is free", "ms", agents, m("resync-own-p50-ms"), "re-attest and reopen its streams, from when its simulator was free")
	own.P99 = m("resync-own-p99-ms")
	revokes := int(m("revokes"))
	revoke := singleRow("signer: node revoke to the agent's Sync closed", "ms", revokes, m("revoke-p50-ms"),
		fmt.Sprintf("until the last of its %d streams ended, %d streams open", agents/max(tpms, 1), agents))
	revoke.P99 = m("revoke-p99-ms")
	rows := []row{
		edit,
		singleRow("signer: CPU per policy edit", "ms", edits, m("signer-cpu-ms/edit"), fmt.Sprintf("user+sys, pushing to %d streams", agents)),
		singleRow("signer: RSS idle", "MiB", 1, m("signer-rss-idle-mib"), "VmRSS"),
		singleRow(fmt.Sprintf("signer: RSS with %d agents' Sync streams", agents), "MiB", 1, m("signer-rss-mib"), "VmRSS, one mTLS connection per stream"),
		singleRow("signer: one attestation, wall time", "ms", tpms, m("attest-ms"), "agent side (simulator TPM) included; signer's part: BenchmarkVerifyAttestation"),
		singleRow("signer: start after kill -9", "ms", 1, m("signer-start-ms"), "exec to serving: config, swtpm, unseal the CA and JWT keys, bundle, listen"),
		resync,
		own,
	}
	if n := int(m("token-revokes")); n > 0 {
		tok := singleRow(fmt.Sprintf("signer: token revoke reaches %d agents' Sync streams", agents), "ms", n, m("token-revoke-p50-ms"),
			"revoke by jti to the last stream's message carrying it: from then every agent refuses the token")
		tok.P99 = m("token-revoke-p99-ms")
		rows = append(rows, tok)
	}
	return append(rows, revoke)
}

// tierRows names the figures of BenchmarkSignerTier.
func tierRows(l goBenchLine) []row {
	m := l.metric
	agents, tpms, replicas := int(m("agents")), int(m("tpms")), int(m("replicas"))
	per := agents / max(replicas, 1)
	apply := singleRow(fmt.Sprintf("signer tier: policy apply reaches %d agents on %d replicas", agents, replicas), "ms", int(m("applies")), m("apply-p50-ms"),
		fmt.Sprintf("apply through one replica (etcd, each replica's watch, push) to the last stream; %d distinct TPMs", tpms))
	apply.P99 = m("apply-p99-ms")
	moved := int(m("moved"))
	kill := singleRow("signer tier: replica killed to its agents re-synced on others", "ms", moved, m("kill-resync-p50-ms"),
		"kill -9 to each stream's first message on another replica; agents re-attest one at a time (one simulator)")
	kill.P99 = m("kill-resync-p99-ms")
	own := singleRow("signer tier: one agent's fail-over once its TPM is free", "ms", moved, m("kill-resync-own-p50-ms"),
		"attest with another replica and reopen its streams, from when its simulator was free")
	own.P99 = m("kill-resync-own-p99-ms")
	return []row{
		apply,
		singleRow("signer tier: CPU per policy apply, busiest replica", "ms", int(m("applies")), m("replica-cpu-ms/apply"),
			fmt.Sprintf("user+sys, each replica pushing to about %d streams", per)),
		singleRow(fmt.Sprintf("signer tier: RSS per replica with about %d agents' Sync streams", per), "MiB", replicas, m("replica-rss-mib"), "VmRSS, largest replica"),
		singleRow("signer tier: CPU per re-attestation, serving replica", "ms", int(m("reattests")), m("replica-cpu-ms/attest"),
			fmt.Sprintf("attest, then reopen the agent's %d Sync streams (one mTLS connection each)", agents/max(tpms, 1))),
		singleRow("signer tier: etcd writes at steady state", "writes/s", 1, m("etcd-writes/s"),
			fmt.Sprintf("over 10 s, every agent connected, %d re-attesting (renewals); etcd revision increments", int(m("reattests")))),
		kill,
		own,
		singleRow("signer tier: etcd writes of that fail-over", "writes", 1, m("kill-etcd-writes"),
			"kill to etcd quiet again: one registry record per agent (TPM) that moved, not per stream"),
	}
}

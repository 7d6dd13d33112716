#!/usr/bin/env bash
# make bench: the Go benchmarks of the hot paths, the signer scale and tier
# runs (go test, cgo simulator; the tier's etcd is embedded), then
# lanyard-bench against a real swtpm, signer and agent; prints one table. Everything runs on loopback in one temporary
# folder, removed on exit. Nothing secret is written: the configs, the
# policy, the public bundle and the daemons' logs; swtpm's own state and
# its stand-in manufacturer CA stay in the temporary folder, as in make demo.
#
# Knobs (environment): BENCH_CALLS (2000), BENCH_STREAMS (1000,10000),
# BENCH_ROTATIONS (3), BENCH_STARTS (3), BENCH_DURATION (6s), BENCH_SCALE_AGENTS (1000),
# BENCH_SCALE_TPMS (100), BENCH_TIER_AGENTS (1000), BENCH_TIER_TPMS (99),
# BENCH_GO (1: run the Go benchmarks, the scale run and the tier run),
# BENCH_TIER (1: run the tier run, about 50 s; 0 skips it),
# BENCH_KEEP (set: keep the logs and configs, the TPM state is removed),
# BENCH_AGENT_LOG_LEVEL (the agent's log_level; default its own, info).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bin"
go=${GO:-go}
# Short: the agent's sockets live here and sun_path holds 108 bytes.
work=$(mktemp -d /tmp/lybench.XXXXXX)

cleanup() {
  "$root/scripts/swtpm.sh" stop "$work/tpm" >/dev/null 2>&1 || true
  if [[ -n "${BENCH_KEEP:-}" ]]; then
    rm -rf "$work/tpm"
    echo "logs and configs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

echo "== build (as make build: CGO_ENABLED=0, -tags ${BUILD_TAGS:-grpcnotrace})" >&2
(cd "$root" && CGO_ENABLED=0 "$go" build -tags "${BUILD_TAGS:-grpcnotrace}" -o "$bin/" ./cmd/lanyard-agent ./cmd/lanyard-signer ./cmd/lanyard-bench)

gobench=()
if [[ "${BENCH_GO:-1}" == 1 ]]; then
  echo "== Go benchmarks of the hot paths (one goroutine: figures are per core)" >&2
  {
    (cd "$root" && "$go" test -run '^$' -cpu 1 -benchtime 500ms -bench 'BenchmarkSignX509SVID$' ./signer/)
    (cd "$root" && "$go" test -run '^$' -cpu 1 -benchtime 50x -bench 'BenchmarkVerifyAttestation$' ./attestor/node/)
    (cd "$root" && "$go" test -run '^$' -cpu 1 -benchtime 500ms -bench 'BenchmarkAttestSelf/warm' ./attestor/workload/)
    (cd "$root" && "$go" test -run '^$' -cpu 1 -benchtime 300ms -bench 'BenchmarkEntryMatching|BenchmarkResponseBuilding' ./agent/)
  } | tee "$work/gobench.txt" >&2
  gobench+=("$work/gobench.txt")
  echo "== signer scale run (simulated agents, cgo TPM simulator)" >&2
  (cd "$root" && LANYARD_SCALE_AGENTS="${BENCH_SCALE_AGENTS:-1000}" LANYARD_SCALE_TPMS="${BENCH_SCALE_TPMS:-100}" \
    "$go" test -run '^$' -bench 'BenchmarkSignerScale$' -benchtime 1x -timeout 10m ./signer/) | tee "$work/scale.txt" >&2
  gobench+=("$work/scale.txt")
fi
if [[ "${BENCH_GO:-1}" == 1 && "${BENCH_TIER:-1}" == 1 ]]; then
  echo "== signer tier run (3 replicas on a real 3-member etcd, simulated agents)" >&2
  (cd "$root" && LANYARD_TIER_AGENTS="${BENCH_TIER_AGENTS:-1000}" LANYARD_TIER_TPMS="${BENCH_TIER_TPMS:-99}" \
    "$go" test -run '^$' -bench 'BenchmarkSignerTier$' -benchtime 1x -timeout 10m ./signer/) | tee "$work/tier.txt" >&2
  gobench+=("$work/tier.txt")
fi

echo "== software TPM" >&2
"$root/scripts/swtpm.sh" provision "$work/tpm" >/dev/null
sock=$("$root/scripts/swtpm.sh" start "$work/tpm")

echo "== lanyard-bench suite (signer, agent, floor on this host)" >&2
files=$(IFS=,; echo "${gobench[*]:-}")
"$bin/lanyard-bench" suite \
  --agent-bin "$bin/lanyard-agent" --signer-bin "$bin/lanyard-signer" \
  --tpm-socket "$sock" --ek-ca "$work/tpm/ek-ca.pem" --dir "$work" \
  --calls "${BENCH_CALLS:-2000}" --streams "${BENCH_STREAMS:-1000,10000}" \
  --rotations "${BENCH_ROTATIONS:-3}" --starts "${BENCH_STARTS:-3}" --duration "${BENCH_DURATION:-6s}" \
  ${BENCH_AGENT_LOG_LEVEL:+--agent-log-level "$BENCH_AGENT_LOG_LEVEL"} ${files:+--gobench "$files"}

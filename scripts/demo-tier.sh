#!/usr/bin/env bash
# make demo-tier: a signer tier on one machine, in one temporary folder. One
# real etcd process (built from its Go module into bin/etcd) on loopback,
# three lanyard-signer replicas each with its own software TPM, and one
# agent given the three addresses. It fetches an SVID, lists the replicas,
# applies an edited policy through one replica, kills -9 the replica the
# agent uses and shows the agent moved and still serving. Everything is
# stopped and removed on exit; nothing secret is written (each replica's
# keys are sealed to its TPM, etcd holds public data only).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bin"
work=$(mktemp -d /tmp/lanyard-tier.XXXXXX)
pids=()
replicas=(signer-1 signer-2 signer-3)

cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	for d in "$work"/tpm-*; do
		[ -d "$d" ] && "$root/scripts/swtpm.sh" stop "$d" >/dev/null 2>&1 || true
	done
	rm -rf "$work"
}
trap cleanup EXIT

if [ -t 1 ]; then
	step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
	step() { printf '\n== %s\n' "$*"; }
fi

die() {
	echo "demo-tier: $*" >&2
	for f in "$work"/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
	exit 1
}

# until N CMD...: run CMD every 0.05 s until it succeeds, at most N times.
until_ok() {
	local n=$1
	shift
	for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
	return 1
}

freeport() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

certs() { grep -c 'BEGIN CERTIFICATE' "$1" 2>/dev/null || echo 0; }

uid=$(id -u)
user=$(id -un)

step "etcd (bin/etcd, built from go.etcd.io/etcd/server/v3) on loopback, data in $work/etcd"
etcd_port=$(freeport)
peer_port=$(freeport)
"$bin/etcd" --name demo --data-dir "$work/etcd" \
	--listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
	--listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
	--initial-cluster "demo=http://127.0.0.1:$peer_port" --log-level warn >"$work/etcd.log" 2>&1 &
pids+=($!)
until_ok 200 curl -fsS "http://127.0.0.1:$etcd_port/health" || die "etcd did not become healthy within 10s"
echo "etcd serving on http://127.0.0.1:$etcd_port"

step "four software TPMs: one per replica (each seals its own keys), one for the agent's host"
for name in "${replicas[@]}" agent; do
	"$root/scripts/swtpm.sh" provision "$work/tpm-$name" >/dev/null
	"$root/scripts/swtpm.sh" start "$work/tpm-$name" >/dev/null
	echo "$name: $work/tpm-$name/tpm.sock"
done

policy() {
	cat <<HCL
# Accept the agent's TPM: its EK certificate chains to the swtpm local CA.
node "demo" {
  ek_ca = ["$work/tpm-agent/ek-ca.pem"]
}
workload "demo" {
  spiffe_id = "spiffe://example.org/demo/$user"
  nodes     = ["demo"]
  selectors = ["unix:uid:$uid"]
  x509_ttl  = "1h"
}
HCL
}
policy >"$work/policy.hcl"

declare -A addr pid
for name in "${replicas[@]}"; do
	addr[$name]="127.0.0.1:$(freeport)"
	mkdir -p "$work/$name"
	cat >"$work/$name/signer.hcl" <<HCL
trust_domain      = "example.org"
replica_name      = "$name"
listen_address    = "${addr[$name]}"
policy_path       = "$work/policy.hcl"   # seeds etcd: only the first replica up writes it
bundle_path       = "bundle.pem"
state_dir         = "$work/$name/state"
admin_socket_path = "$work/$name/admin.sock"
ca_publish_lead   = "2s"
tpm { socket = "$work/tpm-$name/tpm.sock" }
etcd {
  endpoints = ["http://127.0.0.1:$etcd_port"]
  prefix    = "/lanyard/example.org"
}
HCL
done

step "start three replicas: ${replicas[*]}"
for name in "${replicas[@]}"; do
	"$bin/lanyard-signer" run --config "$work/$name/signer.hcl" >"$work/$name.log" 2>&1 &
	pid[$name]=$!
	pids+=($!)
done
# A replica that finds other replicas' CAs in etcd publishes its own and
# listens only ca_publish_lead later, once every replica has pushed it.
for name in "${replicas[@]}"; do
	listening() { grep -q 'signer listening' "$work/$name.log" && [ "$(certs "$work/$name/bundle.pem")" -ge 3 ]; }
	until_ok 400 listening || die "$name is not listening with the three replicas' CAs in its bundle after 20s"
	echo "$name listening on ${addr[$name]}; its bundle.pem holds $(certs "$work/$name/bundle.pem") CAs (every replica's)"
done

step "lanyard-signer replica list"
"$bin/lanyard-signer" replica list --config "$work/signer-1/signer.hcl"

step "start lanyard-agent with the three addresses and fetch an X.509-SVID"
cp "$work/signer-1/bundle.pem" "$work/agent-bundle.pem"
cat >"$work/agent.hcl" <<HCL
trust_domain      = "example.org"
signer_address    = ["${addr[signer-1]}", "${addr[signer-2]}", "${addr[signer-3]}"]
trust_bundle_path = "agent-bundle.pem"
socket_path       = "$work/workload.sock"
admin_socket_path = "$work/admin/admin.sock"
tpm { socket = "$work/tpm-agent/tpm.sock" }
HCL
"$bin/lanyard-agent" run --config "$work/agent.hcl" >"$work/agent.log" 2>&1 &
pids+=($!)
fetch() { "$bin/lanyard-agent" fetch x509 --socket "$work/workload.sock"; }
until_ok 400 fetch || die "no SVID within 20s"
fetch

# The replica the agent is synced to, from `lanyard-agent status --json`:
# the first "address" of the report is its signer's.
synced() {
	"$bin/lanyard-agent" status --json --config "$work/agent.hcl" 2>/dev/null |
		sed -n 's/.*"address": *"\([^"]*\)".*/\1/p' | head -n 1
}
connected() {
	"$bin/lanyard-agent" status --json --config "$work/agent.hcl" 2>/dev/null | grep -q '"connected": *true'
}
until_ok 200 connected || die "the agent is not synced to any replica"
using=$(synced)
victim=
for name in "${replicas[@]}"; do [ "${addr[$name]}" = "$using" ] && victim=$name; done
[ -n "$victim" ] || die "the agent reports signer address '$using', not one of the replicas'"
echo "the agent is synced to $victim ($using)"

step "lanyard-signer policy apply (an added entry), through a replica the agent does not use"
via=signer-1
[ "$victim" = signer-1 ] && via=signer-2
{
	policy
	cat <<HCL
workload "extra" {
  spiffe_id = "spiffe://example.org/extra/$user"
  nodes     = ["demo"]
  selectors = ["unix:uid:$uid"]
}
HCL
} >"$work/policy-v2.hcl"
"$bin/lanyard-signer" policy apply "$work/policy-v2.hcl" --config "$work/$via/signer.hcl"
"$bin/lanyard-signer" policy show --config "$work/$victim/signer.hcl"
has_extra() { fetch | grep -q "spiffe://example.org/extra/$user"; }
until_ok 100 has_extra || die "the applied entry did not reach the agent within 5s"
echo "the agent (synced to $victim) serves spiffe://example.org/extra/$user, applied through $via"

step "kill -9 $victim, the replica the agent uses"
kill -9 "${pid[$victim]}"
wait "${pid[$victim]}" 2>/dev/null || true
t0=$(date +%s%N)
moved() { connected && [ -n "$(synced)" ] && [ "$(synced)" != "$using" ]; }
until_ok 200 moved || die "the agent did not move to another replica within 10s"
t1=$(date +%s%N)
echo "the agent moved to $(synced) about $(((t1 - t0) / 1000000)) ms after the kill (as polled)"
"$bin/lanyard-agent" status --config "$work/agent.hcl" || true
fetch
echo "a fetch still works"

step "lanyard-signer replica list (the killed replica goes down when its lease expires)"
is_down() { "$bin/lanyard-signer" replica list --config "$work/$via/signer.hcl" | grep -w "$victim" | grep -q down; }
until_ok 300 is_down || true
"$bin/lanyard-signer" replica list --config "$work/$via/signer.hcl"

step "done: stopping everything and removing $work"

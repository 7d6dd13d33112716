#!/usr/bin/env bash
# make demo: two software TPMs (the agent's host and the signer's), a signer
# that seals its keys to its own TPM, and an agent, all in one temporary
# folder: an SVID fetched through the SPIFFE Workload API, then the signer
# killed and restarted mid-demo, with the bundle unchanged and the agent
# healthy. Everything is stopped and removed on exit.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bin"
work=$(mktemp -d /tmp/lanyard-demo.XXXXXX)
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  "$root/scripts/swtpm.sh" stop "$work/tpm" >/dev/null 2>&1 || true
  "$root/scripts/swtpm.sh" stop "$work/signer-tpm" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Bold headings on a terminal only: a log file or CI gets plain text.
if [ -t 1 ]; then
	step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
	step() { printf '\n== %s\n' "$*"; }
fi

step "software TPM (swtpm) with an EK certificate from a local CA"
"$root/scripts/swtpm.sh" provision "$work/tpm" >/dev/null
"$root/scripts/swtpm.sh" start "$work/tpm" >/dev/null
echo "TPM socket: $work/tpm/tpm.sock"

step "a second software TPM for the signer's host (it seals the signer's keys)"
"$root/scripts/swtpm.sh" provision "$work/signer-tpm" >/dev/null
"$root/scripts/swtpm.sh" start "$work/signer-tpm" >/dev/null
echo "signer TPM socket: $work/signer-tpm/tpm.sock"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null || echo 8443)
uid=$(id -u)
user=$(id -un)

cat >"$work/signer.hcl" <<HCL
trust_domain   = "example.org"
listen_address = "127.0.0.1:$port"
policy_path    = "policy.hcl"
bundle_path    = "bundle.pem"
state_dir      = "$work/signer-state"
tpm { socket = "$work/signer-tpm/tpm.sock" }   # key_storage = "tpm" by default
admin_socket_path = "$work/signer-admin/admin.sock"
HCL
cat >"$work/policy.hcl" <<HCL
# Accept any TPM whose EK certificate chains to the swtpm local CA.
node "demo" {
  ek_ca = ["$work/tpm/ek-ca.pem"]
}
# Give processes of the current user an identity.
workload "demo" {
  spiffe_id = "spiffe://example.org/demo/$user"
  nodes     = ["demo"]
  selectors = ["unix:uid:$uid"]
  x509_ttl  = "1h"
  hint      = "demo"
}
HCL
cat >"$work/agent.hcl" <<HCL
trust_domain      = "example.org"
signer_address    = "127.0.0.1:$port"
trust_bundle_path = "bundle.pem"
socket_path       = "$work/workload.sock"
admin_socket_path = "$work/admin/admin.sock"
tpm { socket = "$work/tpm/tpm.sock" }
HCL

step "lanyard-signer policy check"
"$bin/lanyard-signer" policy check --config "$work/signer.hcl"

step "lanyard-agent tpm info (what an operator pastes into policy)"
"$bin/lanyard-agent" tpm info --config "$work/agent.hcl"

step "start lanyard-signer on 127.0.0.1:$port"
"$bin/lanyard-signer" run --config "$work/signer.hcl" >"$work/signer.log" 2>&1 &
signer_pid=$!
pids+=($signer_pid)
for _ in $(seq 100); do [ -s "$work/bundle.pem" ] && break; sleep 0.05; done
[ -s "$work/bundle.pem" ] || { cat "$work/signer.log"; echo "signer did not write its bundle" >&2; exit 1; }
echo "trust bundle written to $work/bundle.pem"

step "start lanyard-agent and fetch an X.509-SVID"
t0=$(date +%s%N)
"$bin/lanyard-agent" run --config "$work/agent.hcl" >"$work/agent.log" 2>&1 &
pids+=($!)
ok=
for _ in $(seq 300); do
  if [ -S "$work/workload.sock" ] && out=$("$bin/lanyard-agent" fetch x509 --socket "$work/workload.sock" 2>&1); then
    ok=1; break
  fi
  sleep 0.02
done
t1=$(date +%s%N)
if [ -z "$ok" ]; then
  echo "--- signer log"; cat "$work/signer.log"; echo "--- agent log"; cat "$work/agent.log"
  echo "no SVID within 6s" >&2; exit 1
fi
echo "$out"

step "kill -9 the signer and start it again (its keys are sealed to its TPM)"
before=$(sha256sum <"$work/bundle.pem" | cut -d' ' -f1)
kill -9 "$signer_pid"; wait "$signer_pid" 2>/dev/null || true
"$bin/lanyard-signer" run --config "$work/signer.hcl" >>"$work/signer.log" 2>&1 &
signer_pid=$!
pids+=($signer_pid)
# The restarted signer has started once its log says "signer listening" a
# second time (the first is the run killed above).
for _ in $(seq 200); do [ "$(grep -c 'signer listening' "$work/signer.log")" -ge 2 ] && break; sleep 0.05; done
[ "$(grep -c 'signer listening' "$work/signer.log")" -ge 2 ] || { cat "$work/signer.log"; echo "the signer did not start again" >&2; exit 1; }
after=$(sha256sum <"$work/bundle.pem" | cut -d' ' -f1)
echo "bundle.pem sha256 before restart: $before"
echo "bundle.pem sha256 after restart:  $after"
[ "$before" = "$after" ] || { echo "the bundle changed across the restart" >&2; exit 1; }
grep 'signing keys unsealed' "$work/signer.log" | tail -1
ok=
for _ in $(seq 300); do
  if out=$("$bin/lanyard-agent" fetch x509 --socket "$work/workload.sock" 2>&1); then ok=1; break; fi
  sleep 0.02
done
[ -n "$ok" ] || { cat "$work/agent.log"; echo "no SVID after the signer restart" >&2; exit 1; }
echo "agent still serves its SVID after the restart; no file copied to it"

step "timing"
echo "agent start to first SVID fetched: $(( (t1 - t0) / 1000000 )) ms (wall clock, includes TPM attestation)"
grep -o 'startup_ms=[0-9]*' "$work/agent.log" | head -1 | sed 's/^/agent reports /' || true

if [ "$(id -u)" -eq 0 ]; then
  step "lanyard-agent status after the signer restart (what an SRE runs first)"
  # The agent's sync stream redials with backoff: wait for it to be back.
  for _ in $(seq 300); do
    "$bin/lanyard-agent" status --config "$work/agent.hcl" >/dev/null 2>&1 && break
    sleep 0.05
  done
  "$bin/lanyard-agent" status --config "$work/agent.hcl" || true
  step "lanyard-agent explain $$ (why this shell gets its identity)"
  "$bin/lanyard-agent" explain --config "$work/agent.hcl" "$$" || true
else
  step "lanyard-agent status and explain"
  echo "skipped: the admin socket answers root only (run the demo as root to see them)"
fi

step "agent log"
cat "$work/agent.log"

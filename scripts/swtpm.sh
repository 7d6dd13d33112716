#!/usr/bin/env bash
# swtpm.sh: a software TPM 2.0 with a manufacturer-signed EK certificate, for
# tests and the demo.
#
#   scripts/swtpm.sh provision DIR   manufacture a TPM under DIR; prints DIR/ek-ca.pem
#   scripts/swtpm.sh start DIR       run it on DIR/tpm.sock (daemon); prints the socket path
#   scripts/swtpm.sh stop DIR        stop the daemon started by "start"
#
# Everything lives under DIR, which the caller creates and deletes: the TPM's
# NV state (DIR/state) and the local CA that plays the TPM manufacturer
# (DIR/ca, private keys included). Those two are the emulated hardware and
# its vendor, so they never leave DIR; nothing is written to /etc, /var or
# $HOME. (swtpm_setup 0.7 briefly creates and removes a pid file in /tmp; its
# other scratch files go to DIR/tmp.)
#
# Files after "provision":
#   DIR/ek-ca.pem      public CA chain the EK certificate chains to (root, then issuer)
#   DIR/ek.pem         the RSA EK certificate, PEM (the TPM holds the same DER in NV 0x01c00002)
#   DIR/ek/            EK certificates as DER, as swtpm_setup writes them (ek-rsa2048.crt, ek-secp384r1.crt)
#   DIR/state/         the TPM's NV state
#   DIR/ca/            the local CA (swtpm_localca's state, private keys)
#   DIR/swtpm_setup.conf, DIR/swtpm-localca.conf, DIR/swtpm-localca.options, DIR/swtpm_setup.log
# Files while running: DIR/tpm.sock (TPM command stream), DIR/ctrl.sock
# (swtpm control channel), DIR/swtpm.pid, DIR/swtpm.log.
#
# Every verb is idempotent: provisioning an already provisioned DIR, starting
# a running TPM or stopping a stopped one succeeds and changes nothing.
set -euo pipefail

readonly prog="${0##*/}"
# sun_path holds 108 bytes including the terminating NUL.
readonly max_socket_path=107

die() {
	printf '%s: %s\n' "$prog" "$*" >&2
	exit 1
}

usage() {
	printf 'usage: %s provision|start|stop DIR\n' "$prog" >&2
	exit 2
}

# need_tools fails with one message naming every missing program, so a
# machine without swtpm learns all it must install at once.
need_tools() {
	local missing=() tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
	done
	if ((${#missing[@]} > 0)); then
		die "missing ${missing[*]}: install the Debian packages swtpm and swtpm-tools (make swtpm-deps, or apt-get install -y swtpm swtpm-tools)"
	fi
}

# localca_tool finds swtpm_localca, which Debian installs in /usr/bin and
# other distributions only under /usr/share/swtpm.
localca_tool() {
	local candidate
	for candidate in "$(command -v swtpm_localca 2>/dev/null || true)" \
		/usr/share/swtpm/swtpm-localca /usr/libexec/swtpm/swtpm-localca; do
		if [[ -n "$candidate" && -x "$candidate" ]]; then
			printf '%s\n' "$candidate"
			return 0
		fi
	done
	die "missing swtpm_localca: install the Debian package swtpm-tools (make swtpm-deps)"
}

# abs_dir prints DIR's absolute path: the config files swtpm_setup reads
# and the pid check must not depend on the working directory.
# The path ends up in swtpm's comma-separated options and in config files
# split on whitespace, so those characters are refused.
abs_dir() {
	local dir
	[[ -d "$1" ]] || die "$1 is not a directory"
	dir="$(cd -- "$1" && pwd -P)"
	[[ "$dir" != *[[:space:],]* ]] || die "$dir contains whitespace or a comma, which swtpm's options cannot carry: use another DIR"
	printf '%s\n' "$dir"
}

# pem_certs copies only the certificate blocks of a PEM file: certtool may
# put a text dump before them, and ek-ca.pem must hold certificates alone.
pem_certs() {
	sed -n '/^-----BEGIN CERTIFICATE-----$/,/^-----END CERTIFICATE-----$/p' "$1"
}

provisioned() {
	local dir="$1"
	[[ -s "$dir/ek-ca.pem" && -s "$dir/ek.pem" && -f "$dir/state/tpm2-00.permall" ]]
}

cmd_provision() {
	local dir localca
	# DIR/ca holds the emulated manufacturer's private keys.
	umask 077
	mkdir -p -- "$1" || die "cannot create $1"
	dir="$(abs_dir "$1")"
	if provisioned "$dir"; then
		printf '%s\n' "$dir/ek-ca.pem"
		return 0
	fi
	need_tools swtpm swtpm_setup swtpm_cert certtool sed base64
	localca="$(localca_tool)"
	if running "$dir"; then
		die "a swtpm is running on $dir but its provisioning is incomplete: run '$prog stop $dir' first"
	fi

	# A half-finished earlier run may have left a CA without certificates
	# or state without a CA: start over so the chain is always consistent.
	rm -rf -- "$dir/ca" "$dir/state" "$dir/ek" "$dir/tmp" "$dir/ek.pem" "$dir/ek-ca.pem"
	mkdir -p -- "$dir/ca" "$dir/state" "$dir/ek" "$dir/tmp"

	cat >"$dir/swtpm-localca.conf" <<-EOF
		statedir = $dir/ca
		signingkey = $dir/ca/signkey.pem
		issuercert = $dir/ca/issuercert.pem
		certserial = $dir/ca/certserial
	EOF
	cat >"$dir/swtpm-localca.options" <<-EOF
		--platform-manufacturer Lanyard
		--platform-model swtpm
		--platform-version 1.0
	EOF
	cat >"$dir/swtpm_setup.conf" <<-EOF
		create_certs_tool = $localca
		create_certs_tool_config = $dir/swtpm-localca.conf
		create_certs_tool_options = $dir/swtpm-localca.options
		active_pcr_banks = sha256
	EOF

	# --create-platform-cert implies --create-ek-cert, which implies the
	# EKs: an RSA 2048 EK at 0x81010001 with its certificate in NV
	# 0x01c00002, and an ECC P-384 EK with its certificate in 0x01c00016.
	# --lock-nvram makes those NV indexes read-only, as on real hardware.
	if ! TMPDIR="$dir/tmp" swtpm_setup --tpm2 \
		--tpmstate "$dir/state" \
		--config "$dir/swtpm_setup.conf" \
		--create-ek-cert --create-platform-cert --lock-nvram \
		--write-ek-cert-files "$dir/ek" \
		--logfile "$dir/swtpm_setup.log" \
		--overwrite </dev/null >/dev/null 2>&1; then
		cat -- "$dir/swtpm_setup.log" >&2 2>/dev/null || true
		die "swtpm_setup failed for $dir/state (log above, also in $dir/swtpm_setup.log)"
	fi

	local ek_der="$dir/ek/ek-rsa2048.crt"
	[[ -s "$ek_der" ]] || die "swtpm_setup wrote no RSA EK certificate ($ek_der missing)"
	[[ -s "$dir/ca/swtpm-localca-rootca-cert.pem" && -s "$dir/ca/issuercert.pem" ]] ||
		die "swtpm_localca left no CA certificates in $dir/ca"

	{
		echo '-----BEGIN CERTIFICATE-----'
		base64 -w 64 -- "$ek_der"
		echo '-----END CERTIFICATE-----'
	} >"$dir/ek.pem.tmp"
	mv -f -- "$dir/ek.pem.tmp" "$dir/ek.pem"

	# ek-ca.pem is written last and atomically: its presence is what marks
	# DIR as provisioned.
	{
		pem_certs "$dir/ca/swtpm-localca-rootca-cert.pem"
		pem_certs "$dir/ca/issuercert.pem"
	} >"$dir/ek-ca.pem.tmp"
	[[ "$(grep -c -- '-----BEGIN CERTIFICATE-----' "$dir/ek-ca.pem.tmp")" -eq 2 ]] ||
		die "could not extract the root and issuer certificates from $dir/ca"
	chmod 0644 "$dir/ek-ca.pem.tmp" "$dir/ek.pem"
	mv -f -- "$dir/ek-ca.pem.tmp" "$dir/ek-ca.pem"
	rm -rf -- "$dir/tmp"
	printf '%s\n' "$dir/ek-ca.pem"
}

# swtpm_pid prints the pid from DIR/swtpm.pid if that process is a swtpm
# serving DIR's state; a pid recycled by an unrelated process is ignored so
# "stop" can never signal it.
swtpm_pid() {
	local dir="$1" pid cmdline
	[[ -s "$dir/swtpm.pid" ]] || return 1
	pid="$(tr -dc '0-9' <"$dir/swtpm.pid")"
	[[ -n "$pid" ]] || return 1
	cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || return 1
	[[ "$cmdline" == *swtpm* && "$cmdline" == *"dir=$dir/state"* ]] || return 1
	printf '%s\n' "$pid"
}

running() {
	swtpm_pid "$1" >/dev/null
}

cmd_start() {
	local dir sock pid deadline
	dir="$(abs_dir "$1")"
	sock="$dir/tpm.sock"
	((${#sock} <= max_socket_path)) ||
		die "socket path $sock is ${#sock} bytes, over the $max_socket_path that sun_path allows: use a shorter DIR"
	need_tools swtpm
	provisioned "$dir" || die "$dir is not provisioned: run '$prog provision $dir' first"
	if running "$dir" && [[ -S "$sock" ]]; then
		printf '%s\n' "$sock"
		return 0
	fi
	if running "$dir"; then
		cmd_stop "$dir" >/dev/null
	fi
	rm -f -- "$sock" "$dir/ctrl.sock" "$dir/swtpm.pid"

	# startup-clear: swtpm sends TPM2_Startup itself, as firmware would, so
	# clients talk to a ready TPM. --daemon returns once the sockets are
	# bound; the loop below still waits for them rather than trusting that.
	swtpm socket --tpm2 \
		--tpmstate "dir=$dir/state" \
		--server "type=unixio,path=$sock" \
		--ctrl "type=unixio,path=$dir/ctrl.sock" \
		--flags not-need-init,startup-clear \
		--pid "file=$dir/swtpm.pid" \
		--log "file=$dir/swtpm.log" \
		--daemon </dev/null >>"$dir/swtpm.log" 2>&1 ||
		die "swtpm failed to start; its log: $(tail -n 20 -- "$dir/swtpm.log" 2>/dev/null)"

	deadline=$((SECONDS + 10))
	until [[ -S "$sock" ]] && pid="$(swtpm_pid "$dir")"; do
		((SECONDS < deadline)) || die "swtpm did not create $sock within 10s; its log: $(tail -n 20 -- "$dir/swtpm.log" 2>/dev/null)"
		sleep 0.05
	done
	printf '%s\n' "$sock"
}

cmd_stop() {
	local dir pid deadline
	# Nothing can run on a directory that is gone: stopping it succeeds.
	[[ -d "$1" ]] || return 0
	dir="$(abs_dir "$1")"
	if pid="$(swtpm_pid "$dir")"; then
		kill -TERM "$pid" 2>/dev/null || true
		deadline=$((SECONDS + 10))
		while kill -0 "$pid" 2>/dev/null; do
			if ((SECONDS >= deadline)); then
				kill -KILL "$pid" 2>/dev/null || true
				break
			fi
			sleep 0.05
		done
	fi
	rm -f -- "$dir/tpm.sock" "$dir/ctrl.sock" "$dir/swtpm.pid"
}

main() {
	(($# == 2)) || usage
	[[ -n "$2" ]] || usage
	case "$1" in
	provision) cmd_provision "$2" ;;
	start) cmd_start "$2" ;;
	stop) cmd_stop "$2" ;;
	*) usage ;;
	esac
}

main "$@"

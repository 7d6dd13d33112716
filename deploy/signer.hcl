# lanyard-signer configuration: /etc/lanyard/signer.hcl
# Every key and its default: README.md, "Configuration reference".

trust_domain   = "example.org"
# Agents on other hosts connect here: listen on every interface.
listen_address = "0.0.0.0:8443"
# Relative to this file: /etc/lanyard/policy.hcl. Edits take effect at
# once; an invalid edit is logged and the last good policy stays in force.
policy_path    = "policy.hcl"
# Public. Copy it to every agent host as its trust_bundle_path. Under
# StateDirectory=lanyard-signer of the unit, where the signer may write.
bundle_path    = "/var/lib/lanyard-signer/bundle.pem"
# Public state, and the CA and JWT keys sealed to this host's TPM: a copy
# of this directory is useless on any other host.
state_dir      = "/var/lib/lanyard-signer"
# Root-only: `lanyard-signer status` and `node list|revoke|unrevoke`.
# Under RuntimeDirectory=lanyard-signer of the unit (this is the default).
admin_socket_path = "/run/lanyard-signer/admin.sock"

# This host's TPM protects the signing keys across restarts (key_storage
# defaults to "tpm" with this block): a restart keeps the same CA and the
# bundle does not change. Without a TPM: key_storage = "memory" and no tpm
# block (a restart then makes a new CA; README, "Key storage and restarts").
tpm { device = "/dev/tpmrm0" }

log_level  = "info"
log_format = "text"

# Resource limits (README.md, "Limits"): the defaults suit a large fleet.
# Agents behind one NAT share its address's attestation slots:
# limits {
#   max_pending_attestations_per_address = 64
# }

# OIDC discovery (README.md, "Cloud and Vault: OIDC discovery"): clouds and
# Vault then accept JWT-SVIDs, whose iss becomes this issuer. Plain HTTP on
# loopback for a TLS-terminating proxy that answers at the issuer URL, or
# add tls { cert_file = "...", key_file = "..." } and listen publicly.
# oidc_discovery {
#   listen_address = "127.0.0.1:8446"
#   issuer         = "https://oidc.example.org"
# }

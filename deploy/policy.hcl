# lanyard-signer policy: /etc/lanyard/policy.hcl
# Edits take effect within a second, without a restart; check one with
#   lanyard-signer policy check --config /etc/lanyard/signer.hcl

# Hosts, known by their TPMs. Run `lanyard-agent tpm info --config
# /etc/lanyard/agent.hcl` on a host for its EK SHA-256, or name the TPM
# vendor's EK CA: ek_ca = ["ek-ca.pem"] (relative to this file).
node "web-hosts" {
  ek_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
}

# Identities: a process gets this SPIFFE ID on a web-hosts host when it
# carries every selector (here: it runs as web.service).
workload "web" {
  spiffe_id = "spiffe://example.org/web"
  nodes     = ["web-hosts"]
  selectors = ["systemd:unit:web.service"]
  x509_ttl  = "1h"
  jwt_ttl   = "5m"
  dns_names = ["web.example.org"]
}

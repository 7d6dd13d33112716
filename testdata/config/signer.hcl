trust_domain   = "example.org"
listen_address = "0.0.0.0:9443"
policy_path    = "../policy/valid.hcl"
bundle_path    = "bundle.pem"
admin_socket_path = "admin/admin.sock"
state_dir      = "/tmp/lanyard-signer-state"
ca_ttl         = "48h"
x509_max_ttl   = "12h"
agent_ttl      = "30m"
log_level      = "debug"
log_format     = "json"

limits {
  attest_first_message_timeout = "2s"
  max_pending_attestations     = 512
  max_sync_streams_per_agent   = 3
  jwt_mints_per_second         = 50
}

oidc_discovery {
  listen_address = "0.0.0.0:8446"
  issuer         = "https://oidc.example.org"
  tls {
    cert_file = "tls/oidc.pem"
    key_file  = "tls/oidc-key.pem"
  }
}

trust_domain      = "example.org"
signer_address    = "signer.example.org:8443"
trust_bundle_path = "bundle.pem"
socket_path       = "/run/lanyard-test/workload.sock"
admin_socket_path = "/run/lanyard-test/admin.sock"
log_level         = "warn"
log_format        = "json"

tpm {
  socket = "/run/swtpm/tpm.sock"
}

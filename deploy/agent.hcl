# lanyard-agent configuration: /etc/lanyard/agent.hcl
# Every key and its default: README.md, "Configuration reference".

trust_domain   = "example.org"
# host:port of lanyard-signer; for a tier of replicas, a list of them
# (["10.0.1.1:8443", "10.0.1.2:8443"]) or a name that resolves to all.
signer_address = "signer.example.org:8443"
# The signer's trust bundle (its bundle_path file), copied to this host.
# Relative paths are relative to this file. The agent follows edits of it.
trust_bundle_path = "bundle.pem"

# Both under RuntimeDirectory=lanyard of the unit; the agent makes the
# admin socket's directory root-only (0700).
socket_path       = "/run/lanyard/workload.sock"
admin_socket_path = "/run/lanyard/admin/admin.sock"

# The kernel's TPM resource manager (DeviceAllow= in the unit), or a swtpm
# socket: tpm { socket = "/run/swtpm/tpm.sock" }
tpm {
  device = "/dev/tpmrm0"
}

log_level  = "info"
log_format = "text"

# One replica of a signer tier (README: "Run a signer tier"). Every replica
# has the same trust_domain and etcd block, and its own replica_name, TPM
# and state_dir; the first one also names policy_path, which seeds etcd.
trust_domain   = "example.org"
replica_name   = "signer-1"
listen_address = "0.0.0.0:8443"
bundle_path    = "/var/lib/lanyard-signer/bundle.pem"   # the union of every replica's CAs
state_dir      = "/var/lib/lanyard-signer"
tpm { device = "/dev/tpmrm0" }                          # seals this replica's own CA and JWT keys
# policy_path  = "/etc/lanyard/policy.hcl"              # first replica only: seeds an empty etcd

etcd {
  endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
  prefix    = "/lanyard/example.org"
  # etcd's client credential, authorized for the prefix: not a Lanyard
  # secret (nothing in etcd is secret), but readable by root only. The unit
  # runs as a DynamicUser, so systemd hands the key over: `systemctl edit
  # lanyard-signer` and add
  #   [Service]
  #   LoadCredential=etcd-client-key.pem:/etc/lanyard/etcd/client-key.pem
  tls {
    ca_file   = "/etc/lanyard/etcd/ca.pem"
    cert_file = "/etc/lanyard/etcd/client.pem"
    key_file  = "/run/credentials/lanyard-signer.service/etcd-client-key.pem"
  }
}

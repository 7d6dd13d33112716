# A replica of a signer tier: the policy lives in etcd (policy apply).
trust_domain = "example.org"
replica_name = "signer-2"
bundle_path  = "bundle.pem"
etcd {
  endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
  prefix    = "/lanyard/example.org"
  tls {
    ca_file   = "etcd/ca.pem"
    cert_file = "etcd/client.pem"
    key_file  = "etcd/client-key.pem"
  }
}

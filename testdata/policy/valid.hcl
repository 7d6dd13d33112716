# A policy that exercises every key. Used by signer/policy tests and as an
# example of the format.

node "lab" {
  ek_sha256 = [
    "6C0DFE62A2C3A56A0E3E0A3B1A22E7E4B5C9F1D0A8E3F2B7C6D5E4F3A2B1C0D9",
  ]
  ek_ca = ["ek-ca.pem"]
}

node "edge" {
  ek_sha256 = ["0000000000000000000000000000000000000000000000000000000000000001"]
}

workload "web" {
  spiffe_id = "spiffe://example.org/web"
  nodes     = ["lab"]
  selectors = ["unix:uid:1000", "systemd:unit:web.service", "unix:uid:1000"]
  x509_ttl  = "10s"
  jwt_ttl   = "1m"
  dns_names = ["web.internal", "*.web.internal"]
  hint      = "internal"
}

workload "db" {
  spiffe_id = "spiffe://example.org/db"
  nodes     = ["lab", "edge"]
  selectors = ["cgroup:path:/system.slice/postgresql.service"]
}

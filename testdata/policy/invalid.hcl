node "lab" {
  ek_sha256 = ["not-a-hash"]
  ek_ca     = ["missing.pem"]
}

node "lab" {
  ek_sha256 = ["0000000000000000000000000000000000000000000000000000000000000001"]
}

node "empty" {
}

workload "web" {
  spiffe_id = "spiffe://other.org/web"
  nodes     = ["lab", "nowhere"]
  selectors = ["unix:pid:1"]
  x509_ttl  = "5s"
  dns_names = ["bad_name.internal"]
  colour    = "blue"
}

workload "db" {
  spiffe_id = "spiffe://example.org/db"
  nodes     = ["lab"]
}

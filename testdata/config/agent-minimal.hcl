trust_domain      = "example.org"
signer_address    = "127.0.0.1:8443"
trust_bundle_path = "/etc/lanyard/bundle.pem"
tpm { device = "/dev/tpmrm0" }

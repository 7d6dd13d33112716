trust_domain = "example.org"
policy_path  = "/etc/lanyard/policy.hcl"
bundle_path  = "bundle.pem"

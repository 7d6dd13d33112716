package node

import "time"

// Rematch applies rules to a node accepted earlier and returns the names of
// the rules that accept it now (sorted; none means it is no longer
// accepted). The signer calls it on every policy change, so removing a pin
// or an ek_ca takes a host's entries away at once, not at its next
// attestation. The TPM proved possession of this EK when the node was
// accepted; only policy is re-evaluated here.
func (n *Node) Rematch(rules []Rule, now time.Time) []string {
	ek := &parsedEK{hash: n.EKSHA256}
	if n.EKCertificate != nil {
		ek.setCert(n.EKCertificate)
	}
	m, err := matchRules(ek, rules, now)
	if err != nil {
		return nil
	}
	return m.Names
}

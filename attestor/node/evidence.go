package node

// EKSHA256 returns the hex SHA-256 of the evidence's EK, or "" when the
// evidence holds no EK that parses. It is for the signer's audit line of
// a refused attestation, which must name the TPM even when NewChallenge
// said no before returning a Node.
func (ev *Evidence) EKSHA256() string {
	if ev == nil {
		return ""
	}
	ek, err := parseEK(ev)
	if err != nil {
		return ""
	}
	return ek.hash
}

package node

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/x509"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-attestation/attest"
	x509ext "github.com/google/go-attestation/x509"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/lanyard-dev/lanyard/selector"
)

// Rule is one policy `node` block, as the verifier needs it.
type Rule struct {
	Name     string
	EKSHA256 []string // pinned EKs, lowercase hex SHA-256 of the PKIX public key
	// Roots and Intermediates are the rule's ek_ca certificates; Roots is
	// nil when the rule has no ek_ca.
	Roots, Intermediates *x509.CertPool
}

// Node is what the verifier learned about an accepted TPM.
type Node struct {
	EKSHA256 string
	Names    []string // the rules the TPM matched, sorted
	// Manufacturer, Model and Version come from the EK certificate's TCG
	// subjectAltName, and only when that certificate chained to some rule's
	// ek_ca: a pinned TPM's certificate is vouched for by nobody, and the
	// NV index holding it is writable by the host's owner.
	Manufacturer, Model, Version string
	EKCertificate                *x509.Certificate        // as the TPM presented it; nil without one
	CSR                          *x509.CertificateRequest // checked: its public key is the certified TPM key
}

// Selectors returns the node selectors of the TPM, sorted:
// tpm:ek-sha256:<hex>, and tpm:manufacturer:, tpm:model:, tpm:version: when
// known.
func (n *Node) Selectors() []string {
	sel := []string{selector.TPMEKSHA256 + n.EKSHA256}
	for _, kv := range [][2]string{{selector.TPMManufacturer, n.Manufacturer}, {selector.TPMModel, n.Model}, {selector.TPMVersion, n.Version}} {
		if kv[1] != "" {
			sel = append(sel, kv[0]+kv[1])
		}
	}
	slices.Sort(sel)
	return sel
}

// Challenge is a credential activation challenge for one Evidence. It holds
// the secret only the TPM with the EK, holding the AK, can recover, and
// accepts exactly one answer.
type Challenge struct {
	mu         sync.Mutex
	secret     []byte
	credential attest.EncryptedCredential
	node       *Node
	used       bool
}

// Credential is what the agent passes to Session.Activate.
func (c *Challenge) Credential() attest.EncryptedCredential {
	return c.credential
}

// Verify checks the TPM's answer in constant time and returns the accepted
// node. It takes one answer only: any further call fails with
// ErrChallengeUsed, so an answer cannot be guessed twice or replayed.
func (c *Challenge) Verify(answer []byte) (*Node, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.used {
		return nil, refuse(ErrChallengeUsed, "ek-sha256 %s", c.node.EKSHA256)
	}
	c.used = true
	ok := subtle.ConstantTimeCompare(c.secret, answer) == 1
	clear(c.secret)
	if !ok {
		return nil, refuse(ErrActivationMismatch, "ek-sha256 %s", c.node.EKSHA256)
	}
	return c.node, nil
}

// NewChallenge checks everything about ev that needs no answer from the TPM
// and returns the credential activation challenge. In order: the evidence
// decodes; policy accepts the EK (pinned by hash, or its certificate chains
// to an ek_ca at now); the AK is a restricted TPM-generated key; the AK
// certified the signing key; the CSR is for, and signed by, that key. rnd
// feeds the activation secret (nil means crypto/rand).
func NewChallenge(ev *Evidence, rules []Rule, rnd io.Reader, now time.Time) (*Challenge, error) {
	if ev == nil {
		return nil, refuse(ErrMalformedEvidence, "no evidence")
	}
	ek, err := parseEK(ev)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(ev.CSR)
	if err != nil {
		return nil, refuse(ErrMalformedEvidence, "ek-sha256 %s: parse CSR: %v", ek.hash, err)
	}
	node, err := matchRules(ek, rules, now)
	if err != nil {
		return nil, err
	}

	params := attest.ActivationParameters{EK: ek.pub, AK: ev.AK, Rand: rnd}
	if err := params.CheckAKParameters(); err != nil {
		return nil, refuse(ErrAKInvalid, "ek-sha256 %s: %v", ek.hash, err)
	}
	// Generate checks the AK again; what fails now is ours (randomness), not
	// the evidence's.
	secret, cred, err := params.Generate()
	if err != nil {
		return nil, fmt.Errorf("attestor: ek-sha256 %s: generate activation challenge: %w", ek.hash, err)
	}
	akPub, err := attest.ParseAKPublic(ev.AK.Public)
	if err != nil {
		return nil, refuse(ErrAKInvalid, "ek-sha256 %s: %v", ek.hash, err)
	}
	if err := ev.Key.Verify(attest.VerifyOpts{Public: akPub.Public, Hash: akPub.Hash}); err != nil {
		return nil, refuse(ErrKeyNotCertified, "ek-sha256 %s: %v", ek.hash, err)
	}
	keyPub, err := certifiedKey(ev.Key.Public)
	if err != nil {
		return nil, refuse(ErrKeyNotCertified, "ek-sha256 %s: %v", ek.hash, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(ErrCSRKeyMismatch, "ek-sha256 %s: CSR signature: %v", ek.hash, err)
	}
	if !keyPub.Equal(csr.PublicKey) {
		return nil, refuse(ErrCSRKeyMismatch, "ek-sha256 %s: the CSR is for another key", ek.hash)
	}
	node.CSR = csr
	return &Challenge{secret: secret, credential: *cred, node: node}, nil
}

// parsedEK is the EK as the evidence presents it.
type parsedEK struct {
	pub  crypto.PublicKey
	hash string
	cert *x509.Certificate // nil without one
	// ekc is cert read along the TCG EK profile; nil when cert does not
	// follow it, and then profileErr says why.
	ekc        *x509ext.EKCertificate
	profileErr error
}

// setCert takes cert as the EK's certificate, and its key as the EK, and
// reads it along the TCG EK profile. ToEKCertificate also clears the TCG
// subjectAltName from the unhandled critical extensions, which x509
// verification would otherwise reject.
func (ek *parsedEK) setCert(cert *x509.Certificate) {
	ek.cert, ek.pub = cert, cert.PublicKey
	ek.ekc, ek.profileErr = x509ext.ToEKCertificate(cert)
}

// parseEK decodes the EK certificate and public key. Either may be absent,
// not both, and when both are given they must hold the same key.
func parseEK(ev *Evidence) (*parsedEK, error) {
	ek := &parsedEK{}
	if len(ev.EKCertificate) > 0 {
		cert, err := attest.ParseEKCertificate(ev.EKCertificate)
		if err != nil {
			return nil, refuse(ErrMalformedEvidence, "parse EK certificate: %v", err)
		}
		if cert.PublicKey == nil {
			// crypto/x509 leaves RSA-OAEP keys unparsed; without the key the
			// certificate cannot be tied to the EK that activation uses.
			return nil, refuse(ErrMalformedEvidence, "EK certificate key (%v) is not supported", cert.PublicKeyAlgorithm)
		}
		ek.setCert(cert)
	}
	if len(ev.EKPublic) > 0 {
		pub, err := x509.ParsePKIXPublicKey(ev.EKPublic)
		if err != nil {
			return nil, refuse(ErrMalformedEvidence, "parse EK public key: %v", err)
		}
		if ek.pub != nil {
			eq, ok := pub.(interface{ Equal(crypto.PublicKey) bool })
			if !ok || !eq.Equal(ek.pub) {
				return nil, refuse(ErrMalformedEvidence, "EK certificate and EK public key differ")
			}
		}
		ek.pub = pub
	}
	switch pub := ek.pub.(type) {
	case nil:
		return nil, refuse(ErrMalformedEvidence, "no EK")
	case *rsa.PublicKey, *ecdsa.PublicKey:
	default:
		return nil, refuse(ErrMalformedEvidence, "EK is a %T, want RSA or ECDSA", pub)
	}
	hash, err := ekSHA256(ek.pub)
	if err != nil {
		return nil, refuse(ErrMalformedEvidence, "encode EK: %v", err)
	}
	ek.hash = hash
	return ek, nil
}

// matchRules applies policy: a rule accepts the EK when it pins the hash, or
// when the EK certificate chains to the rule's ek_ca at now. It returns the
// node with the names of every rule that accepted it.
func matchRules(ek *parsedEK, rules []Rule, now time.Time) (*Node, error) {
	node := &Node{EKSHA256: ek.hash, EKCertificate: ek.cert}
	var haveCA, chained bool
	var chainErrs []string
	for _, r := range rules {
		if slices.ContainsFunc(r.EKSHA256, func(pin string) bool { return strings.EqualFold(pin, ek.hash) }) {
			node.Names = append(node.Names, r.Name)
			continue
		}
		if r.Roots == nil {
			continue
		}
		haveCA = true
		if ek.cert == nil {
			continue
		}
		if ek.profileErr != nil {
			chainErrs = append(chainErrs, fmt.Sprintf("not a TCG EK certificate: %v", ek.profileErr))
			continue
		}
		_, err := ek.cert.Verify(x509.VerifyOptions{
			Roots:         r.Roots,
			Intermediates: r.Intermediates,
			CurrentTime:   now,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		})
		if err != nil {
			chainErrs = append(chainErrs, fmt.Sprintf("rule %q: %v", r.Name, err))
			continue
		}
		chained = true
		node.Names = append(node.Names, r.Name)
	}
	if len(node.Names) == 0 {
		switch {
		case !haveCA:
			return nil, refuse(ErrUnknownEK, "ek-sha256 %s", ek.hash)
		case ek.cert == nil:
			return nil, refuse(ErrEKCertMissing, "ek-sha256 %s", ek.hash)
		default:
			return nil, refuse(ErrEKCertUntrusted, "ek-sha256 %s: %s", ek.hash, strings.Join(slices.Compact(chainErrs), "; "))
		}
	}
	slices.Sort(node.Names)
	node.Names = slices.Compact(node.Names)
	if chained {
		node.Manufacturer, node.Model, node.Version = ek.ekc.TpmManufacturer, ek.ekc.TpmModel, ek.ekc.TpmVersion
	}
	return node, nil
}

// certifiedKey decodes the public key of the certified signing key.
func certifiedKey(public []byte) (interface{ Equal(crypto.PublicKey) bool }, error) {
	tpub, err := tpm2.DecodePublic(public)
	if err != nil {
		return nil, fmt.Errorf("decode certified key: %v", err)
	}
	pub, err := tpub.Key()
	if err != nil {
		return nil, fmt.Errorf("decode certified key: %v", err)
	}
	eq, ok := pub.(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return nil, fmt.Errorf("certified key is a %T", pub)
	}
	return eq, nil
}

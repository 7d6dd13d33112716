package signer

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/rotator"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// CAStateFile is the file in state_dir where the signer keeps the public
// certificates of every CA in its trust bundle, so that a restarted signer
// still publishes the CAs that signed SVIDs which are yet to expire. It
// holds CERTIFICATE PEM blocks only; no private key is ever written.
const CAStateFile = "ca-certs.pem"

// ErrBadCAState is returned by New when state_dir's CA file cannot be
// used. The signer refuses to start rather than drop CAs that may still
// vouch for live SVIDs: fix or remove the file named in the error.
var ErrBadCAState = errors.New("unusable CA state file")

// authority is the signer's CAs over time, each with its JWT signing key. The active CA signs. A prepared
// successor is published ca_publish_lead before it takes over, so every
// relying party already trusts it when its first SVID appears. Earlier CAs
// stay published, certificate only, until everything they signed has
// expired. Private keys exist for the active and prepared CAs only, in
// memory. A JWT key follows its CA through the same phases: published with
// it, signing while it signs, then kept (public half only) until the last
// token it signed expires. When to do what is rotator's decision;
// authority carries it out.
//
// authority is not safe for concurrent use: the Signer's mutex guards it.
type authority struct {
	td   spiffeid.TrustDomain
	ttl  time.Duration
	lead time.Duration
	log  hclog.Logger
	// issuer is the iss claim of every JWT-SVID: the oidc_discovery
	// issuer, or "" (no iss) without that block.
	issuer string

	active     *CA
	lastSigned time.Time // latest NotAfter of anything active signed
	next       *CA       // published, not signing yet; nil when none
	earlier    []earlierCA

	activeJWT     *jwtKey
	jwtLastSigned time.Time // latest exp of any token activeJWT signed
	nextJWT       *jwtKey   // set with next
	earlierJWT    []publicJWTKey

	// signedIDs are the published CAs ("ca:<serial>") and JWT keys
	// ("jwt:<kid>") known to have signed. When markSigned is set (memory
	// mode), the first signature of each is recorded through it before
	// the SVID or token leaves, so a restart can drop the ones that never
	// signed.
	signedIDs  map[string]bool
	markSigned func(ids []string) error
}

// earlierCA is a published CA that no longer signs (or whose key this
// process never had), kept until keepUntil.
type earlierCA struct {
	cert      *x509.Certificate
	keepUntil time.Time
}

// restoredState is what an earlier run left in state_dir.
type restoredState struct {
	cas []*x509.Certificate // published CAs, in bundle order
	jwt []publicJWTKey      // published JWT keys, in bundle order
	// keys are the decrypted private keys of the generations that were
	// signing or prepared (key_storage "tpm"); nil in memory mode.
	keys []restoredKeys
	// signed, when not nil, names the CAs ("ca:<serial>") and JWT keys
	// ("jwt:<kid>") that ever signed: the others never vouched for
	// anything and are not kept (memory mode). nil keeps them all.
	signed map[string]bool
}

// newAuthority continues where the earlier run stopped when st holds the
// keys of its signing generation (sealed to the TPM): that CA signs again,
// with its prepared successor, and the bundle is unchanged. Otherwise it
// starts with a fresh CA and JWT key. Restored CAs without a key are
// published alongside: what such a CA signed is unknown, so it is kept
// until its own NotAfter, which nothing it signed can outlive; a restored
// JWT key until the keep-until time saved with it. The expired ones, and
// (with st.signed) those that never signed, are dropped at once.
func newAuthority(td spiffeid.TrustDomain, ttl, lead time.Duration, st restoredState, now time.Time, log hclog.Logger) (*authority, error) {
	a := &authority{td: td, ttl: ttl, lead: lead, log: log, signedIDs: make(map[string]bool)}
	used := make(map[string]bool) // serials and kids restored with their keys
	for _, role := range []string{roleActive, roleNext} {
		i := slices.IndexFunc(st.keys, func(k restoredKeys) bool { return k.role == role })
		if i < 0 || (role == roleNext && a.active == nil) {
			continue
		}
		ca, key, err := restoreGeneration(td, st.keys[i], st.cas, st.jwt)
		if err != nil {
			return nil, err
		}
		if ca == nil {
			// Written before its certificate: it was never published,
			// so it never signed. Dropping it is safe.
			log.Warn("stored key generation has no published certificate, not restored", "role", role, "serial", st.keys[i].caSerial, "kid", st.keys[i].kid)
			continue
		}
		used[serialHex(ca.Cert)], used[key.kid] = true, true
		if role == roleActive {
			// What it signed before the restart is unknown: assume the
			// longest, so it stays published while anything may live.
			a.active, a.activeJWT = ca, key
			a.lastSigned, a.jwtLastSigned = ca.Cert.NotAfter, key.notAfter
			a.signedIDs["ca:"+serialHex(ca.Cert)], a.signedIDs["jwt:"+key.kid] = true, true
		} else {
			a.next, a.nextJWT = ca, key
		}
		log.Info("CA restored with its key", "role", role, "serial", serialHex(ca.Cert), "kid", key.kid, "not_after", ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if a.active == nil {
		ca, err := NewCA(td, ttl, now)
		if err != nil {
			return nil, err
		}
		key, err := newJWTKey(ca.Cert.NotAfter)
		if err != nil {
			return nil, err
		}
		a.active, a.activeJWT = ca, key
	}
	unsigned := func(id string) bool { return st.signed != nil && !st.signed[id] }
	for _, k := range st.jwt {
		switch {
		case used[k.kid]:
			continue
		case rotator.Droppable(now, k.keepUntil):
			log.Info("earlier JWT key expired, not published", "kid", k.kid, "keep_until", k.keepUntil.UTC().Format(time.RFC3339))
			continue
		case unsigned("jwt:" + k.kid):
			log.Info("earlier JWT key never signed, not published", "kid", k.kid)
			continue
		}
		a.earlierJWT = append(a.earlierJWT, k)
		if st.signed != nil {
			a.signedIDs["jwt:"+k.kid] = true
		}
		log.Info("earlier JWT key restored", "kid", k.kid, "keep_until", k.keepUntil.UTC().Format(time.RFC3339))
	}
	for _, c := range st.cas {
		switch {
		case used[serialHex(c)]:
			continue
		case rotator.Droppable(now, c.NotAfter):
			log.Info("earlier CA expired, not published", "serial", serialHex(c), "not_after", c.NotAfter.UTC().Format(time.RFC3339))
			continue
		case unsigned("ca:" + serialHex(c)):
			log.Info("earlier CA never signed, not published", "serial", serialHex(c))
			continue
		}
		a.earlier = append(a.earlier, earlierCA{cert: c, keepUntil: c.NotAfter})
		if st.signed != nil {
			a.signedIDs["ca:"+serialHex(c)] = true
		}
		log.Info("earlier CA restored", "serial", serialHex(c), "keep_until", c.NotAfter.UTC().Format(time.RFC3339))
	}
	return a, nil
}

// restoreGeneration pairs decrypted keys with their published certificate
// and JWT key. It returns nil, nil, nil when either was never published,
// and ErrKeyStorage when a key does not match what was published.
func restoreGeneration(td spiffeid.TrustDomain, k restoredKeys, cas []*x509.Certificate, jwts []publicJWTKey) (*CA, *jwtKey, error) {
	ci := slices.IndexFunc(cas, func(c *x509.Certificate) bool { return serialHex(c) == k.caSerial })
	ji := slices.IndexFunc(jwts, func(p publicJWTKey) bool { return p.kid == k.kid })
	if ci < 0 || ji < 0 {
		return nil, nil, nil
	}
	cert := cas[ci]
	if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&k.caKey.PublicKey) {
		return nil, nil, fmt.Errorf("%w %s: the CA key of serial %s does not match its certificate in %s", ErrKeyStorage, SigningKeysFile, k.caSerial, CAStateFile)
	}
	if !jwts[ji].pub.Equal(&k.jwtKey.PublicKey) {
		return nil, nil, fmt.Errorf("%w %s: the JWT key %s does not match its public key in %s", ErrKeyStorage, SigningKeysFile, k.kid, JWTStateFile)
	}
	key, err := jwtKeyFrom(k.jwtKey, k.kid, cert.NotAfter)
	if err != nil {
		return nil, nil, err
	}
	return &CA{td: td, key: k.caKey, Cert: cert}, key, nil
}

// current returns the CA that signs at now. A prepared successor whose
// time has come takes over here, not only at the next tick, so that a late
// timer can never make the old CA sign an SVID that outlives it.
func (a *authority) current(now time.Time) *CA {
	if a.next != nil {
		if _, activate := rotator.CAPhase(now, issued(a.active), a.active.Cert.NotAfter, a.lead); activate {
			a.activate()
		}
	}
	return a.active
}

// sign issues an X.509-SVID from the CA current at now, and remembers its
// NotAfter: that CA stays published until the last SVID it signed expires.
func (a *authority) sign(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration, dnsNames []string, now time.Time) (*x509.Certificate, error) {
	ca := a.current(now)
	if err := a.noteSigned("ca:" + serialHex(ca.Cert)); err != nil {
		return nil, err
	}
	cert, err := ca.SignX509SVID(pub, id, ttl, dnsNames, now)
	if err != nil {
		return nil, err
	}
	if cert.NotAfter.After(a.lastSigned) {
		a.lastSigned = cert.NotAfter
	}
	return cert, nil
}

// mintJWT signs a JWT-SVID with the key current at now, and remembers
// its expiry: that key stays published until the last token it signed
// expires.
func (a *authority) mintJWT(c jwtClaims, now time.Time) (signedJWT, error) {
	a.current(now)
	k := a.activeJWT
	if err := a.noteSigned("jwt:" + k.kid); err != nil {
		return signedJWT{}, err
	}
	m, err := k.mint(a.issuer, c, now)
	if err != nil {
		return signedJWT{}, err
	}
	if m.exp.After(a.jwtLastSigned) {
		a.jwtLastSigned = m.exp
	}
	return m, nil
}

// noteSigned records that id signs, the first time it does, through
// markSigned. A failure refuses the signature: an unrecorded signer could
// be dropped from the bundle while what it signed lives.
func (a *authority) noteSigned(id string) error {
	if a.markSigned == nil || a.signedIDs[id] {
		return nil
	}
	a.signedIDs[id] = true
	if err := a.markSigned(a.signedList()); err != nil {
		delete(a.signedIDs, id)
		return err
	}
	return nil
}

// signedList is signedIDs restricted to what is published, sorted.
func (a *authority) signedList() []string {
	pub := make(map[string]bool)
	for _, c := range a.published() {
		pub["ca:"+serialHex(c)] = true
	}
	for _, k := range a.publishedJWT() {
		pub["jwt:"+k.kid] = true
	}
	var ids []string
	for id := range a.signedIDs {
		if pub[id] {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// tick carries out every decision due at now: prepare and publish the
// successor, hand signing over to it, drop earlier CAs whose SVIDs have
// all expired. It reports whether the published set changed, and the next
// instant a decision falls due (always after now).
func (a *authority) tick(now time.Time) (changed bool, next time.Time, err error) {
	// A loop, not a single step: after a long pause (a suspended host) the
	// successor may itself be past its half-life; each round creates a CA
	// at now at most, whose own decisions lie in the future, so it ends.
	for {
		nb, na := issued(a.active), a.active.Cert.NotAfter
		prepare, activate := rotator.CAPhase(now, nb, na, a.lead)
		if prepare && a.next == nil {
			ca, err := NewCA(a.td, a.ttl, now)
			if err != nil {
				return changed, now, fmt.Errorf("prepare next CA: %w", err)
			}
			key, err := newJWTKey(ca.Cert.NotAfter)
			if err != nil {
				return changed, now, fmt.Errorf("prepare next JWT key: %w", err)
			}
			a.next, a.nextJWT = ca, key
			changed = true
			a.log.Info("next CA published", "serial", serialHex(ca.Cert), "kid", key.kid,
				"signs_from", rotator.CAActivateAt(nb, na).UTC().Format(time.RFC3339),
				"not_after", ca.Cert.NotAfter.UTC().Format(time.RFC3339))
		}
		if !activate {
			break
		}
		a.activate()
	}
	kept := a.earlier[:0]
	for _, e := range a.earlier {
		if rotator.Droppable(now, e.keepUntil) {
			changed = true
			a.log.Info("earlier CA dropped from the bundle", "serial", serialHex(e.cert))
			continue
		}
		kept = append(kept, e)
	}
	clear(a.earlier[len(kept):])
	a.earlier = kept
	keptJWT := a.earlierJWT[:0]
	for _, k := range a.earlierJWT {
		if rotator.Droppable(now, k.keepUntil) {
			changed = true
			a.log.Info("earlier JWT key dropped from the bundle", "kid", k.kid)
			continue
		}
		keptJWT = append(keptJWT, k)
	}
	clear(a.earlierJWT[len(keptJWT):])
	a.earlierJWT = keptJWT

	nb, na := issued(a.active), a.active.Cert.NotAfter
	next = rotator.CAActivateAt(nb, na)
	if a.next == nil {
		next = rotator.CAPrepareAt(nb, na, a.lead)
	}
	for _, e := range a.earlier {
		if at := rotator.DropAt(e.keepUntil); at.Before(next) {
			next = at
		}
	}
	for _, k := range a.earlierJWT {
		if at := rotator.DropAt(k.keepUntil); at.Before(next) {
			next = at
		}
	}
	return changed, next, nil
}

// issued is when ca was created. Rotation counts from there rather than
// from the backdated NotBefore: a CA then signs from ca_publish_lead after
// its creation until ca_ttl/2 after it, so a lead of at most ca_ttl/4 (what
// the config allows) is honoured exactly, and at hand-over it still has
// ca_ttl/2 to live, the longest SVID it may sign.
func issued(ca *CA) time.Time { return ca.Cert.NotBefore.Add(backdate) }

// activate hands signing to the prepared successor and its JWT key. The
// published set does not change: the old CA and JWT key join the earlier
// ones, each kept until the last SVID or token it signed expires (at once
// if it signed none).
func (a *authority) activate() {
	old := a.active
	a.earlier = slices.Insert(a.earlier, 0, earlierCA{cert: old.Cert, keepUntil: a.lastSigned})
	a.active, a.next, a.lastSigned = a.next, nil, time.Time{}
	oldJWT := a.activeJWT.public()
	oldJWT.keepUntil = a.jwtLastSigned
	a.earlierJWT = slices.Insert(a.earlierJWT, 0, oldJWT)
	a.activeJWT, a.nextJWT, a.jwtLastSigned = a.nextJWT, nil, time.Time{}
	a.log.Info("CA rotated", "serial", serialHex(a.active.Cert), "previous_serial", serialHex(old.Cert),
		"previous_kept_until", a.earlier[0].keepUntil.UTC().Format(time.RFC3339),
		"kid", a.activeJWT.kid, "previous_kid", oldJWT.kid,
		"previous_kid_kept_until", oldJWT.keepUntil.UTC().Format(time.RFC3339))
}

// published is the trust bundle: the active CA, the prepared successor,
// then the earlier CAs, newest first.
func (a *authority) published() []*x509.Certificate {
	cas := make([]*x509.Certificate, 0, 2+len(a.earlier))
	cas = append(cas, a.active.Cert)
	if a.next != nil {
		cas = append(cas, a.next.Cert)
	}
	for _, e := range a.earlier {
		cas = append(cas, e.cert)
	}
	return cas
}

// publishedJWT is the JWT bundle: the active key, the prepared successor,
// then the earlier keys, newest first.
func (a *authority) publishedJWT() []publicJWTKey {
	keys := make([]publicJWTKey, 0, 2+len(a.earlierJWT))
	keys = append(keys, a.activeJWT.public())
	if a.nextJWT != nil {
		keys = append(keys, a.nextJWT.public())
	}
	return append(keys, a.earlierJWT...)
}

// publication is what publish writes: the published CAs and JWT keys,
// the private keys of the signing and prepared generations, and the IDs
// known to have signed.
type publication struct {
	cas          []*x509.Certificate
	keys         []publicJWTKey
	active, next *CA
	activeJWT    *jwtKey
	nextJWT      *jwtKey
	signed       []string
}

func (a *authority) publication() publication {
	return publication{cas: a.published(), keys: a.publishedJWT(), active: a.active, next: a.next,
		activeJWT: a.activeJWT, nextJWT: a.nextJWT, signed: a.signedList()}
}

// loadCAState reads the CA certificates an earlier run kept in dir. A
// missing file (first start) gives none; anything else the file holds
// than CA certificates of td is an error naming the file.
func loadCAState(dir string, td spiffeid.TrustDomain) ([]*x509.Certificate, error) {
	data, path, err := readState(dir, CAStateFile)
	if err != nil || data == nil {
		return nil, wrapErr("read CA state", err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w %s: %s", ErrBadCAState, path, fmt.Sprintf(format, args...))
	}
	want := td.ID().String()
	var certs []*x509.Certificate
	rest := data
	for i := 1; ; i++ {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			if len(bytes.TrimSpace(rest)) > 0 {
				return nil, bad("block %d: not PEM", i)
			}
			break
		}
		// Only the type is named: the block's content is not repeated in
		// an error, whatever it is.
		if block.Type != "CERTIFICATE" {
			return nil, bad("block %d is %q, want CERTIFICATE", i, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, bad("block %d: %v", i, err)
		}
		if !c.IsCA || len(c.URIs) != 1 || c.URIs[0].String() != want {
			return nil, bad("block %d (serial %s) is not a CA of trust domain %s", i, serialHex(c), td)
		}
		if !slices.ContainsFunc(certs, c.Equal) {
			certs = append(certs, c)
		}
	}
	return certs, nil
}

// saveCAState keeps cas (public certificates only) in dir, atomically.
func saveCAState(dir string, cas []*x509.Certificate) error {
	if err := writeBundle(filepath.Join(dir, CAStateFile), cas); err != nil {
		return fmt.Errorf("save CA state: %w", err)
	}
	return nil
}

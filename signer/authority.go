package signer

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
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

	active     *CA
	lastSigned time.Time // latest NotAfter of anything active signed
	next       *CA       // published, not signing yet; nil when none
	earlier    []earlierCA

	activeJWT     *jwtKey
	jwtLastSigned time.Time // latest exp of any token activeJWT signed
	nextJWT       *jwtKey   // set with next
	earlierJWT    []publicJWTKey
}

// earlierCA is a published CA that no longer signs (or whose key this
// process never had), kept until keepUntil.
type earlierCA struct {
	cert      *x509.Certificate
	keepUntil time.Time
}

// newAuthority starts with a fresh CA and JWT key and publishes the
// restored certificates of earlier CAs and the restored JWT keys alongside
// them. What a restored CA signed is unknown, so it is kept until its own
// NotAfter, which nothing it signed can outlive; a restored JWT key until
// the keep-until time saved with it. The expired ones are dropped at once.
func newAuthority(td spiffeid.TrustDomain, ttl, lead time.Duration, restored []*x509.Certificate, restoredJWT []publicJWTKey, now time.Time, log hclog.Logger) (*authority, error) {
	ca, err := NewCA(td, ttl, now)
	if err != nil {
		return nil, err
	}
	key, err := newJWTKey(ca.Cert.NotAfter)
	if err != nil {
		return nil, err
	}
	a := &authority{td: td, ttl: ttl, lead: lead, log: log, active: ca, activeJWT: key}
	for _, k := range restoredJWT {
		if rotator.Droppable(now, k.keepUntil) {
			log.Info("earlier JWT key expired, not published", "kid", k.kid, "keep_until", k.keepUntil.UTC().Format(time.RFC3339))
			continue
		}
		a.earlierJWT = append(a.earlierJWT, k)
		log.Info("earlier JWT key restored", "kid", k.kid, "keep_until", k.keepUntil.UTC().Format(time.RFC3339))
	}
	for _, c := range restored {
		if rotator.Droppable(now, c.NotAfter) {
			log.Info("earlier CA expired, not published", "serial", serialHex(c), "not_after", c.NotAfter.UTC().Format(time.RFC3339))
			continue
		}
		a.earlier = append(a.earlier, earlierCA{cert: c, keepUntil: c.NotAfter})
		log.Info("earlier CA restored", "serial", serialHex(c), "keep_until", c.NotAfter.UTC().Format(time.RFC3339))
	}
	return a, nil
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
	cert, err := a.current(now).SignX509SVID(pub, id, ttl, dnsNames, now)
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
// expires. It returns the token, the key ID and the expiry.
func (a *authority) mintJWT(id spiffeid.ID, audience []string, ttl time.Duration, now time.Time) (string, string, time.Time, error) {
	a.current(now)
	k := a.activeJWT
	tok, exp, err := k.mint(id, audience, ttl, now)
	if err != nil {
		return "", "", time.Time{}, err
	}
	if exp.After(a.jwtLastSigned) {
		a.jwtLastSigned = exp
	}
	return tok, k.kid, exp, nil
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

// loadCAState reads the CA certificates an earlier run kept in dir. A
// missing file (first start) gives none; anything else the file holds
// than CA certificates of td is an error naming the file.
func loadCAState(dir string, td spiffeid.TrustDomain) ([]*x509.Certificate, error) {
	path := filepath.Join(dir, CAStateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read CA state: %w", err)
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

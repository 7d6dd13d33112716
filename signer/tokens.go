package signer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TokenRevocationsStateFile keeps the token revocations in force in
// state_dir. Public data only: token IDs, SPIFFE IDs, reasons, times.
const TokenRevocationsStateFile = "token-revocations.json"

// maxJTIBytes bounds a jti given to revoke (the signer's own are 22).
const maxJTIBytes = 128

// maxTokenRevocationWait bounds how long the expiry timer sleeps between
// looks at the wall clock (see maxCAWait).
const maxTokenRevocationWait = time.Minute

// The token revocations' refusals.
var (
	ErrBadTokenRevocation   = errors.New("bad token revocation")
	ErrTokenAlreadyRevoked  = errors.New("token already revoked")
	ErrBadTokenRevokedState = errors.New("unusable token revocations file")
	// ErrTierTokenRevocation refuses a token revocation on a tier
	// replica: kept by one replica only, it would not reach the agents
	// of the others, which is worse than a clear refusal.
	ErrTierTokenRevocation = errors.New("token revocation is not yet shared by a signer tier: not revoked")
)

// TokenRevocation refuses JWT-SVIDs on every agent: one token by its jti,
// or every token of a SPIFFE ID issued before IssuedBefore. It is kept
// until ExpiresAt, when every token it covers has expired.
type TokenRevocation struct {
	JTI          string    `json:"jti,omitempty"`
	SPIFFEID     string    `json:"spiffe_id,omitempty"`
	IssuedBefore time.Time `json:"issued_before,omitzero"`
	Reason       string    `json:"reason"`
	At           time.Time `json:"at"`
	ByUID        uint32    `json:"by_uid"`
	ExpiresAt    time.Time `json:"expires_at"`
}

// key is what a revocation replaces: the same jti, or the same ID.
func (r TokenRevocation) key() string {
	if r.JTI != "" {
		return "jti:" + r.JTI
	}
	return "id:" + r.SPIFFEID
}

// TokenRevokeRequest is the body of the admin socket's token revoke:
// exactly one of JTI and SPIFFEID.
type TokenRevokeRequest struct {
	JTI      string `json:"jti,omitempty"`
	SPIFFEID string `json:"spiffe_id,omitempty"`
	Reason   string `json:"reason"`
}

type tokenRevocationsFile struct {
	Revocations []TokenRevocation `json:"revocations"`
}

// newTokenRevocation is the revocation req asks for at now. A token
// lives at most maxTTL (jwt_max_ttl caps every JWT-SVID and action
// token), so one issued at or before now has expired by now + maxTTL.
// Claims carry whole seconds: a SPIFFE ID's cut-off is the next whole
// second, so that every token issued in the second of the revocation is
// covered too (one minted right after it, in that second, as well: the
// safe side). A pure function of now, so expiry is testable.
func newTokenRevocation(req TokenRevokeRequest, td spiffeid.TrustDomain, maxTTL time.Duration, now time.Time, byUID uint32) (TokenRevocation, error) {
	if err := checkReason(req.Reason); err != nil {
		return TokenRevocation{}, err
	}
	cut := now.Truncate(time.Second).Add(time.Second)
	r := TokenRevocation{Reason: req.Reason, At: now.UTC(), ByUID: byUID, ExpiresAt: cut.Add(maxTTL).UTC()}
	switch {
	case (req.JTI == "") == (req.SPIFFEID == ""):
		return TokenRevocation{}, fmt.Errorf("%w: name exactly one of a token ID (jti) and a SPIFFE ID", ErrBadTokenRevocation)
	case req.JTI != "":
		if err := checkJTI(req.JTI); err != nil {
			return TokenRevocation{}, err
		}
		r.JTI = req.JTI
	default:
		id, err := spiffeid.FromString(req.SPIFFEID)
		switch {
		case err != nil:
			return TokenRevocation{}, fmt.Errorf("%w: SPIFFE ID %q: %v", ErrBadTokenRevocation, req.SPIFFEID, err)
		case id.TrustDomain() != td:
			return TokenRevocation{}, fmt.Errorf("%w: SPIFFE ID %q is not in trust domain %s", ErrBadTokenRevocation, req.SPIFFEID, td)
		case id.Path() == "":
			return TokenRevocation{}, fmt.Errorf("%w: SPIFFE ID %q has no path: no JWT-SVID is issued to a trust domain", ErrBadTokenRevocation, req.SPIFFEID)
		}
		r.SPIFFEID, r.IssuedBefore = id.String(), cut.UTC()
	}
	return r, nil
}

// checkJTI accepts a token ID as the signer writes them: base64url.
func checkJTI(jti string) error {
	if len(jti) > maxJTIBytes {
		return fmt.Errorf("%w: jti of %d bytes (limit %d)", ErrBadTokenRevocation, len(jti), maxJTIBytes)
	}
	if i := strings.IndexFunc(jti, func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '-' || r == '_')
	}); i >= 0 {
		return fmt.Errorf("%w: jti %q: byte %d is not base64url (a token's jti claim, as `lanyard-agent fetch jwt` prints it)", ErrBadTokenRevocation, jti, i)
	}
	return nil
}

// liveTokenRevocations is revs without those expired at now, sorted by
// key (so two signers with the same set send the same message).
func liveTokenRevocations(revs []TokenRevocation, now time.Time) []TokenRevocation {
	out := make([]TokenRevocation, 0, len(revs))
	for _, r := range revs {
		if now.Before(r.ExpiresAt) {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b TokenRevocation) int { return strings.Compare(a.key(), b.key()) })
	return out
}

// loadTokenRevocations reads the revocations in dir still in force at
// now; a missing file is none.
func loadTokenRevocations(dir string, now time.Time) ([]TokenRevocation, error) {
	b, path, err := readState(dir, TokenRevocationsStateFile)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrBadTokenRevokedState, path, err)
	}
	if b == nil {
		return nil, nil
	}
	var f tokenRevocationsFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrBadTokenRevokedState, path, err)
	}
	for i, r := range f.Revocations {
		if (r.JTI == "") == (r.SPIFFEID == "") || r.ExpiresAt.IsZero() {
			return nil, fmt.Errorf("%w %s: revocation %d: needs exactly one of jti and spiffe_id, and expires_at", ErrBadTokenRevokedState, path, i+1)
		}
	}
	return liveTokenRevocations(f.Revocations, now), nil
}

// saveTokenRevocations writes revs to state_dir (a lone signer's).
func (s *Signer) saveTokenRevocations(revs []TokenRevocation) error {
	b, err := json.MarshalIndent(tokenRevocationsFile{Revocations: revs}, "", "  ")
	if err != nil {
		return fmt.Errorf("save token revocations: %w", err)
	}
	if err := writeAtomic(filepath.Join(s.cfg.StateDir, TokenRevocationsStateFile), append(b, '\n')); err != nil {
		return fmt.Errorf("save token revocations: %w", err)
	}
	return nil
}

// TokenRevocations returns the revocations in force.
func (s *Signer) TokenRevocations() []TokenRevocation {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.tokenRevs)
}

// RevokeToken revokes one token (req.JTI) or every token of a SPIFFE ID
// issued until now (req.SPIFFEID): persisted first, then pushed on every
// agent's Sync stream at once. Bad input returns an error and changes
// nothing.
func (s *Signer) RevokeToken(req TokenRevokeRequest, byUID uint32) (TokenRevocation, error) {
	now := time.Now()
	r, err := newTokenRevocation(req, s.cfg.TrustDomain, s.cfg.JWTMaxTTL, now, byUID)
	if err != nil {
		return TokenRevocation{}, err
	}
	s.tokenRevsMu.Lock()
	defer s.tokenRevsMu.Unlock()
	s.mu.Lock()
	next := slices.Clone(s.tokenRevs)
	s.mu.Unlock()
	i := slices.IndexFunc(next, func(o TokenRevocation) bool { return o.key() == r.key() })
	switch {
	case i >= 0 && r.JTI != "":
		return TokenRevocation{}, fmt.Errorf("%w: jti %s (reason: %s)", ErrTokenAlreadyRevoked, r.JTI, next[i].Reason)
	case i >= 0:
		next[i] = r // a later cut-off covers every token the earlier one did
	default:
		next = append(next, r)
	}
	next = liveTokenRevocations(next, now)
	if err := s.persistTokenRevocations(next); err != nil {
		return TokenRevocation{}, fmt.Errorf("revoke token: %w", err)
	}
	s.setTokenRevocations(next)
	s.log.Warn("token revoked", "jti", r.JTI, "spiffe_id", r.SPIFFEID, "reason", r.Reason, "by_uid", byUID,
		"expires_at", r.ExpiresAt.Format(time.RFC3339))
	return r, nil
}

// persistTokenRevocations keeps revs: in state_dir for a lone signer.
func (s *Signer) persistTokenRevocations(revs []TokenRevocation) error {
	if s.tier != nil {
		return ErrTierTokenRevocation
	}
	return s.saveTokenRevocations(revs)
}

// setTokenRevocations puts revs in force and wakes every Sync stream.
func (s *Signer) setTokenRevocations(revs []TokenRevocation) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenRevs = revs
	s.tokenRevMsgs = tokenRevocationMessages(revs)
	s.notifyLocked()
}

// tokenRevocationMessages is revs as agents receive them.
func tokenRevocationMessages(revs []TokenRevocation) []*signerpb.TokenRevocation {
	out := make([]*signerpb.TokenRevocation, 0, len(revs))
	for _, r := range revs {
		m := &signerpb.TokenRevocation{Jti: r.JTI, SpiffeId: r.SPIFFEID, Reason: r.Reason, ExpiresAt: r.ExpiresAt.Unix()}
		if r.SPIFFEID != "" {
			m.IssuedBefore = r.IssuedBefore.Unix()
		}
		out = append(out, m)
	}
	return out
}

// expireTokenRevocations drops the revocations expired at now (saved,
// and pushed again without them) and returns when the next one expires
// (zero when none is left).
func (s *Signer) expireTokenRevocations(now time.Time) (time.Time, error) {
	s.tokenRevsMu.Lock()
	defer s.tokenRevsMu.Unlock()
	s.mu.Lock()
	cur := s.tokenRevs
	s.mu.Unlock()
	live := liveTokenRevocations(cur, now)
	if len(live) != len(cur) {
		if err := s.persistTokenRevocations(live); err != nil {
			return now, err
		}
		s.setTokenRevocations(live)
		s.log.Info("token revocations expired", "dropped", len(cur)-len(live), "in_force", len(live))
	}
	var next time.Time
	for _, r := range live {
		if next.IsZero() || r.ExpiresAt.Before(next) {
			next = r.ExpiresAt
		}
	}
	return next, nil
}

// expireTokenRevocationsLoop drops revocations as they expire, until ctx
// ends. A failed save is retried at the next look.
func (s *Signer) expireTokenRevocationsLoop(ctx context.Context) error {
	for {
		wait := maxTokenRevocationWait
		next, err := s.expireTokenRevocations(time.Now())
		if err != nil {
			s.log.Error("expired token revocations not dropped", "error", err)
		} else if !next.IsZero() {
			wait = min(wait, max(time.Until(next), 0)+10*time.Millisecond)
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil
		}
	}
}

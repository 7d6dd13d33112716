package signer

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestNewTokenRevocation(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 400e6, time.UTC)
	cut := time.Date(2026, 3, 1, 12, 0, 1, 0, time.UTC)
	tests := []struct {
		name    string
		req     TokenRevokeRequest
		want    TokenRevocation
		wantErr error
		msg     string
	}{
		{name: "by jti", req: TokenRevokeRequest{JTI: "AbC-_09xyzAbC-_09xyzAb", Reason: "leaked"},
			want: TokenRevocation{JTI: "AbC-_09xyzAbC-_09xyzAb", Reason: "leaked", At: now, ByUID: 7, ExpiresAt: cut.Add(time.Hour)}},
		{name: "by SPIFFE ID", req: TokenRevokeRequest{SPIFFEID: "spiffe://example.org/bot/action/github.read", Reason: "compromised"},
			want: TokenRevocation{SPIFFEID: "spiffe://example.org/bot/action/github.read", IssuedBefore: cut, Reason: "compromised", At: now, ByUID: 7,
				ExpiresAt: cut.Add(time.Hour)}},
		{name: "neither", req: TokenRevokeRequest{Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: "bad token revocation: name exactly one of a token ID (jti) and a SPIFFE ID"},
		{name: "both", req: TokenRevokeRequest{JTI: "a", SPIFFEID: "spiffe://example.org/w", Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: "bad token revocation: name exactly one of a token ID (jti) and a SPIFFE ID"},
		{name: "jti not base64url", req: TokenRevokeRequest{JTI: "ab+c", Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: "bad token revocation: jti \"ab+c\": byte 2 is not base64url (a token's jti claim, as `lanyard-agent fetch jwt` prints it)"},
		{name: "jti too long", req: TokenRevokeRequest{JTI: strings.Repeat("a", 129), Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: "bad token revocation: jti of 129 bytes (limit 128)"},
		{name: "other trust domain", req: TokenRevokeRequest{SPIFFEID: "spiffe://other.org/w", Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: `bad token revocation: SPIFFE ID "spiffe://other.org/w" is not in trust domain example.org`},
		{name: "not a SPIFFE ID", req: TokenRevokeRequest{SPIFFEID: "https://example.org/w", Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: `bad token revocation: SPIFFE ID "https://example.org/w": scheme is missing or invalid`},
		{name: "trust domain only", req: TokenRevokeRequest{SPIFFEID: "spiffe://example.org", Reason: "x"}, wantErr: ErrBadTokenRevocation,
			msg: `bad token revocation: SPIFFE ID "spiffe://example.org" has no path: no JWT-SVID is issued to a trust domain`},
		{name: "empty reason", req: TokenRevokeRequest{JTI: "a", Reason: " "}, wantErr: ErrBadReason,
			msg: `bad revocation reason: empty (say why, e.g. --reason "host decommissioned")`},
		{name: "control character in reason", req: TokenRevokeRequest{JTI: "a", Reason: "a\nb"}, wantErr: ErrBadReason,
			msg: `bad revocation reason: control character U+000A at byte 1`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := newTokenRevocation(tt.req, testTD, time.Hour, now, 7)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || err.Error() != tt.msg {
					t.Fatalf("error %v, want %q (%v)", err, tt.msg, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("revocation (-want +got):\n%s", diff)
			}
		})
	}
}

// TestTokenRevocationExpiry: a revocation outlives every token it covers
// (issued up to now, living at most jwt_max_ttl) and is dropped after.
func TestTokenRevocationExpiry(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 999e6, time.UTC)
	r, err := newTokenRevocation(TokenRevokeRequest{SPIFFEID: "spiffe://example.org/w", Reason: "x"}, testTD, 5*time.Minute, now, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The last token covered: issued in the revocation's second.
	lastExp := now.Truncate(time.Second).Add(5 * time.Minute)
	if r.ExpiresAt.Before(lastExp) || r.IssuedBefore.Unix() <= now.Unix() {
		t.Errorf("revocation %+v does not cover a token issued at %v expiring %v", r, now, lastExp)
	}
	for _, tc := range []struct {
		at   time.Time
		kept int
	}{
		{lastExp, 1},
		{r.ExpiresAt.Add(-time.Nanosecond), 1},
		{r.ExpiresAt, 0},
	} {
		if got := len(liveTokenRevocations([]TokenRevocation{r}, tc.at)); got != tc.kept {
			t.Errorf("at %v: %d kept, want %d", tc.at, got, tc.kept)
		}
	}
}

// TestTokenRevocationsPersisted: revocations are saved in state_dir and
// reloaded by New; the expired ones are dropped at load and by the
// expiry step, which pushes the set again.
func TestTokenRevocationsPersisted(t *testing.T) {
	dir := t.TempDir()
	s := newTestSigner(t, dir, "")
	r1, err := s.RevokeToken(TokenRevokeRequest{JTI: "tok1", Reason: "leaked"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := s.RevokeToken(TokenRevokeRequest{SPIFFEID: "spiffe://example.org/bot", Reason: "compromised"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RevokeToken(TokenRevokeRequest{JTI: "tok1", Reason: "again"}, 0); !errors.Is(err, ErrTokenAlreadyRevoked) {
		t.Errorf("second revoke of a jti: %v, want ErrTokenAlreadyRevoked", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "state", TokenRevocationsStateFile))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"jti": "tok1"`) || !strings.Contains(string(b), "compromised") {
		t.Errorf("state file:\n%s", b)
	}

	s2 := newTestSigner(t, dir, "")
	want := []TokenRevocation{r2, r1} // sorted: "id:" before "jti:"
	if diff := cmp.Diff(want, s2.TokenRevocations()); diff != "" {
		t.Errorf("reloaded (-want +got):\n%s", diff)
	}

	// The jti one expires first: the expiry step drops it, saves and pushes.
	s2.mu.Lock()
	s2.tokenRevs[1].ExpiresAt = r1.At.Add(time.Second)
	changed := s2.changed
	s2.mu.Unlock()
	next, err := s2.expireTokenRevocations(r1.At.Add(2 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if !next.Equal(r2.ExpiresAt) {
		t.Errorf("next expiry %v, want %v", next, r2.ExpiresAt)
	}
	select {
	case <-changed:
	default:
		t.Error("dropping a revocation did not wake the Sync streams")
	}
	if got := s2.TokenRevocations(); len(got) != 1 || got[0].SPIFFEID != "spiffe://example.org/bot" {
		t.Errorf("after expiry: %+v", got)
	}
	s3 := newTestSigner(t, dir, "")
	if got := s3.TokenRevocations(); len(got) != 1 {
		t.Errorf("reloaded after expiry: %+v", got)
	}
	// Loading drops what expired meanwhile.
	revs, err := loadTokenRevocations(filepath.Join(dir, "state"), r2.ExpiresAt)
	if err != nil || len(revs) != 0 {
		t.Errorf("load after every expiry: %v, %+v", err, revs)
	}
}

//go:build cgo

package agent

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestUpstreamMintJWTSVIDs(t *testing.T) {
	e := newSimEnv(t)
	_, msg := e.firstSync(t)
	st, err := newJWTState(simTD(), msg.GetBundle().GetJwtAuthorities())
	if err != nil {
		t.Fatalf("JWT bundle from Sync: %v", err)
	}
	if n := len(msg.GetBundle().GetJwtAuthorities()); n != 1 {
		t.Fatalf("Sync bundle has %d JWT keys, want 1", n)
	}
	if a, b := msg.GetBundle().GetJwtAuthorities(), e.res.GetBundle().GetJwtAuthorities(); !sameJWTKeys(a, b) {
		t.Error("Attest and Sync carry different JWT keys")
	}
	tests := []struct {
		name     string
		reqs     []*signerpb.JWTSVIDRequest
		wantCode codes.Code
		wantErr  string // per-request error; "" means a token is expected
	}{
		{name: "own entry", reqs: []*signerpb.JWTSVIDRequest{{EntryId: "mine", Audience: []string{"aud"}}}},
		{name: "another node's entry", reqs: []*signerpb.JWTSVIDRequest{{EntryId: "theirs", Audience: []string{"aud"}}}, wantErr: `entry "theirs": entry is not authorized for this node`},
		{name: "unknown entry", reqs: []*signerpb.JWTSVIDRequest{{EntryId: "nosuch", Audience: []string{"aud"}}}, wantErr: `entry "nosuch": no such entry in the policy`},
		{name: "no audience", reqs: []*signerpb.JWTSVIDRequest{{EntryId: "mine"}}, wantCode: codes.InvalidArgument},
		{name: "too many requests", reqs: slices.Repeat([]*signerpb.JWTSVIDRequest{{EntryId: "mine", Audience: []string{"aud"}}}, 1001), wantCode: codes.InvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.u.mintJWTSVIDs(callCtx(t), tc.reqs)
			if status.Code(err) != tc.wantCode {
				t.Fatalf("mintJWTSVIDs error = %v, want code %v", err, tc.wantCode)
			}
			if err != nil {
				return
			}
			if len(resp) != 1 {
				t.Fatalf("got %d answers, want one", len(resp))
			}
			if tc.wantErr != "" {
				if resp[0].GetError() != tc.wantErr || resp[0].GetToken() != "" {
					t.Errorf("answer: error %q, token %t; want error %q and no token", resp[0].GetError(), resp[0].GetToken() != "", tc.wantErr)
				}
				return
			}
			svid, err := jwtsvid.ParseAndValidate(resp[0].GetToken(), st.set, []string{"aud"})
			if err != nil {
				t.Fatalf("token does not validate against the synced JWT bundle: %v", err)
			}
			iat := svid.Claims["iat"].(float64)
			if svid.ID.String() != "spiffe://example.org/mine" || svid.Expiry.Unix()-int64(iat) != int64((5*time.Minute).Seconds()) {
				t.Errorf("sub %s, lifetime %ds; want spiffe://example.org/mine and the default jwt_ttl 300s", svid.ID, svid.Expiry.Unix()-int64(iat))
			}
		})
	}
}

// BenchmarkJWTSVIDs measures the agent's JWTSVIDs for one entry: from the
// token cache, and minted by a real signer over loopback mTLS gRPC (a new
// audience each time, so every call misses).
func BenchmarkJWTSVIDs(b *testing.B) {
	e := newSimEnv(b)
	_, msg := e.firstSync(b)
	c := newCache(simTD().String())
	c.setEntries(entriesFrom(msg.GetEntries(), simTD(), hclog.NewNullLogger()))
	j := newJWTSource(c, e.u.mintJWTSVIDs, hclog.NewNullLogger())
	runPart(b, j.Run)
	sel := []string{"unix:uid:1000"}
	b.Run("cached", func(b *testing.B) {
		if _, err := j.JWTSVIDs(b.Context(), sel, "", []string{"bench"}); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := j.JWTSVIDs(b.Context(), sel, "", []string{"bench"}); err != nil {
				b.Fatal(err)
			}
		}
	})
	n := 0 // across runs too: -count repeats only the sub-benchmarks
	b.Run("uncached", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			n++
			if _, err := j.JWTSVIDs(b.Context(), sel, "", []string{fmt.Sprintf("aud-%d", n)}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

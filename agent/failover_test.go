package agent

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// goneSigner answers MintJWTSVIDs as a replica behind a broken connection
// does: Unavailable.
type goneSigner struct {
	signerpb.UnimplementedSignerServer
	calls atomic.Int32
}

func (s *goneSigner) MintJWTSVIDs(context.Context, *signerpb.MintJWTSVIDsRequest) (*signerpb.MintJWTSVIDsResponse, error) {
	s.calls.Add(1)
	return nil, status.Error(codes.Unavailable, "connection closed")
}

// TestJWTMintSwitchesReplica: a JWT-SVID call that finds the replica in
// use unreachable makes the agent switch when another replica can serve,
// and is answered by the new one; with a single signer it fails at once,
// as before.
func TestJWTMintSwitchesReplica(t *testing.T) {
	reqs := []*signerpb.JWTSVIDRequest{{EntryId: "web", Audience: []string{"aud"}}}
	tests := []struct {
		name      string
		addrs     []string
		wantCode  codes.Code
		wantSwtch bool
	}{
		{"another replica: answered there", []string{"10.0.1.1:8443", "10.0.1.2:8443"}, codes.OK, true},
		{"single signer: the error", []string{"10.0.1.1:8443"}, codes.Unavailable, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gone, next := &goneSigner{}, &forgetfulSigner{}
			next.known.Store(true)
			a := New(&Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), SignerAddresses: tt.addrs}, nil)
			a.up.replicas.use(replica{addr: tt.addrs[0], authority: tt.addrs[0]})
			conn := serveFake(t, gone)
			nextConn := serveFake(t, next)
			a.up.link = conn
			a.up.reattestWait = 5 * time.Second
			if tt.wantSwtch {
				go func() {
					// What attest does with another replica once asked:
					// a new connection, announced on newCon.
					select {
					case <-a.up.reattest:
					case <-t.Context().Done():
						return
					}
					conn.mu.Lock()
					conn.conn = nextConn.conn
					conn.newCon.notify()
					conn.mu.Unlock()
				}()
			}
			resp, err := a.up.mintJWTSVIDs(t.Context(), reqs)
			if got := status.Code(err); got != tt.wantCode {
				t.Fatalf("mintJWTSVIDs: %v, want code %v", err, tt.wantCode)
			}
			if err == nil && (len(resp) != 1 || resp[0].GetToken() != "token") {
				t.Errorf("mintJWTSVIDs answered %v, want one token", resp)
			}
			if !tt.wantSwtch {
				select {
				case <-a.up.reattest:
					t.Error("a single signer's broken connection asked for a new attestation")
				default:
				}
			}
			if gone.calls.Load() != 1 {
				t.Errorf("the unreachable replica was called %d times, want 1", gone.calls.Load())
			}
		})
	}
}

// TestReportNamesReplicas: status --json names the replica in use, the
// configured addresses, the candidates and the replicas not reached
// recently, under stable field names.
func TestReportNamesReplicas(t *testing.T) {
	const a, b = "10.0.1.1:8443", "10.0.1.2:8443"
	ag := New(&Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), SignerAddresses: []string{a, b}}, nil)
	now := time.Now()
	ag.started = now
	ag.up.replicas.use(replica{addr: b, authority: b})
	ag.up.replicas.failed(a, status.Error(codes.Unavailable, "connection refused"), now.Add(-time.Second))
	doc, err := json.Marshal(ag.Report(now).Signer)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(doc, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"address":     b,
		"addresses":   []any{a, b},
		"candidates":  []any{a, b},
		"unreachable": []any{map[string]any{"address": a, "error": "rpc error: code = Unavailable desc = connection refused", "at": now.Add(-time.Second).Format(time.RFC3339Nano)}},
		"connected":   false,
	}
	for k, w := range want {
		if diff := cmp.Diff(w, got[k]); diff != "" {
			t.Errorf("signer.%s (-want +got):\n%s", k, diff)
		}
	}
}

package agent

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// forgetfulSigner answers MintJWTSVIDs with Unauthenticated, as a signer
// that restarted does, until known is set (the agent attested again).
type forgetfulSigner struct {
	signerpb.UnimplementedSignerServer
	known atomic.Bool
	calls atomic.Int32
}

func (s *forgetfulSigner) MintJWTSVIDs(_ context.Context, req *signerpb.MintJWTSVIDsRequest) (*signerpb.MintJWTSVIDsResponse, error) {
	s.calls.Add(1)
	if !s.known.Load() {
		return nil, status.Error(codes.Unauthenticated, "agent is not attested with this signer (restarted): attest again")
	}
	resp := &signerpb.MintJWTSVIDsResponse{}
	for _, r := range req.GetRequests() {
		resp.Svids = append(resp.Svids, &signerpb.MintedJWTSVID{EntryId: r.GetEntryId(), Token: "token"})
	}
	return resp, nil
}

// serveFake serves srv on loopback until the test ends and returns an
// upstream connected to it (the signer the upstream talks to is the
// fake; the agent logic under test is real).
func serveFake(t *testing.T, srv signerpb.SignerServer) *signerConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	signerpb.RegisterSignerServer(gs, srv)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	u := &signerConn{addr: lis.Addr().String()}
	u.conn = dialFake(t, u.addr)
	return u
}

func dialFake(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestJWTMintWaitsForReattestation: a JWT-SVID call that finds the agent
// unknown to the signer asks for a new attestation, waits for it, and is
// answered on the new identity; without one in time it fails with the
// signer's refusal.
func TestJWTMintWaitsForReattestation(t *testing.T) {
	reqs := []*signerpb.JWTSVIDRequest{{EntryId: "web", Audience: []string{"aud"}}}
	tests := []struct {
		name      string
		reattests bool // the attestation loop (played by the test) attests again
		wantCode  codes.Code
		wantCalls int32
	}{
		{"answered after the new attestation", true, codes.OK, 2},
		{"no attestation in time: the refusal", false, codes.Unauthenticated, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sig := &forgetfulSigner{}
			a := New(&Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org")}, nil)
			conn := serveFake(t, sig)
			a.up.link = conn
			a.up.reattestWait = 2 * time.Second
			attested := make(chan struct{})
			go func() {
				defer close(attested)
				select {
				case <-a.up.reattest:
				case <-time.After(10 * time.Second):
					t.Error("no attestation asked for")
					return
				}
				if !tt.reattests {
					return
				}
				// What upstream.attest does on success: a new
				// connection, announced on newCon.
				sig.known.Store(true)
				c := dialFake(t, conn.addr)
				conn.mu.Lock()
				conn.conn = c
				conn.newCon.notify()
				conn.mu.Unlock()
			}()
			resp, err := a.up.mintJWTSVIDs(t.Context(), reqs)
			<-attested
			if got := status.Code(err); got != tt.wantCode {
				t.Fatalf("mintJWTSVIDs: %v, want code %v", err, tt.wantCode)
			}
			if err == nil && (len(resp) != 1 || resp[0].GetToken() != "token") {
				t.Errorf("mintJWTSVIDs answered %v, want one token", resp)
			}
			if got := sig.calls.Load(); got != tt.wantCalls {
				t.Errorf("signer called %d times, want %d", got, tt.wantCalls)
			}
		})
	}
}

package signer

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestStopEndsSyncStreams: a stopping signer ends its agents' Sync streams
// at once, with Unavailable (agents reconnect to its successor), instead of
// waiting out the grace period for streams that never end by themselves;
// it logs the stop.
func TestStopEndsSyncStreams(t *testing.T) {
	s := serveTestSigner(t, "", "")
	id := spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/aa")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	st, err := signerpb.NewSignerClient(s.dialAs(t, "127.0.0.1", s.agentSVID(t, id))).Sync(ctx, &signerpb.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatalf("first Sync message: %v", err)
	}
	if err := s.stop(); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	_, err = st.Recv()
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "the signer is shutting down") {
		t.Errorf("Sync stream after stop: %v, want Unavailable: the signer is shutting down", err)
	}
	for _, line := range []string{`"signer stopping"`, `"signer stopped"`} {
		if !strings.Contains(s.logs.String(), line) {
			t.Errorf("log lacks %s:\n%s", line, s.logs)
		}
	}
}

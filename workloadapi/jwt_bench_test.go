package workloadapi

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	wlclient "github.com/spiffe/go-spiffe/v2/workloadapi"
)

// cachedJWTSource answers every caller with the same minted tokens, as the
// agent's cache does between renewals: what is left is the server's own
// cost (attestation, the call, the audit line).
type cachedJWTSource struct {
	*fakeJWTSource
	svids []*workload.JWTSVID
}

func (s cachedJWTSource) JWTSVIDs(context.Context, []string, string, []string) ([]*workload.JWTSVID, error) {
	return s.svids, nil
}

// benchServer runs a Server on a fresh socket for the benchmark, with a
// discarding logger, and returns a go-spiffe client connected to it.
func benchServer(b *testing.B, src JWTSource) *wlclient.Client {
	b.Helper()
	path := filepath.Join(socketDir(b), "w.sock")
	s := New(Config{SocketPath: path, Attestor: unixOnly, Source: newFakeSource(nil), JWT: src, Log: hclog.NewNullLogger()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	b.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("Run: %v", err)
		}
	})
	select {
	case <-s.Ready():
	case err := <-done:
		b.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		b.Fatal("server not ready after 10s")
	}
	c, err := wlclient.New(ctx, wlclient.WithAddr("unix://"+path))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	return c
}

// BenchmarkValidateJWTSVID measures validating one ES256 JWT-SVID: in the
// handler alone, and through the socket with go-spiffe's client (which
// also parses the token again on its side).
func BenchmarkValidateJWTSVID(b *testing.B) {
	iss := newJWTIssuer(b, "k1")
	src := newFakeJWTSource(b, iss)
	token := iss.mint(b, jwtClaims(time.Now(), "/web", "a"))
	b.Run("handler", func(b *testing.B) {
		h := &handler{jwt: src, tokens: NewTokenGuard(0), log: hclog.NewNullLogger()}
		req := &workload.ValidateJWTSVIDRequest{Svid: token, Audience: "a"}
		ctx := context.Background()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := h.ValidateJWTSVID(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("socket", func(b *testing.B) {
		c := benchServer(b, src)
		ctx := context.Background()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.ValidateJWTSVID(ctx, token, "a"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkFetchJWTSVID measures one FetchJWTSVID through the socket with
// go-spiffe's client, from a source that holds the token already.
func BenchmarkFetchJWTSVID(b *testing.B) {
	iss := newJWTIssuer(b, "k1")
	src := newFakeJWTSource(b, iss)
	src.entitle(uidSelector(), "spiffe://example.org/web")
	svids, err := src.JWTSVIDs(context.Background(), []string{uidSelector()}, "", []string{"a"})
	if err != nil {
		b.Fatal(err)
	}
	c := benchServer(b, cachedJWTSource{fakeJWTSource: src, svids: svids})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a"}); err != nil {
			b.Fatal(err)
		}
	}
}

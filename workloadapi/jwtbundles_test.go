package workloadapi

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestFetchJWTBundles(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	tests := []struct {
		name     string
		bundles  *workload.JWTBundlesResponse
		wantCode codes.Code
	}{
		{name: "bundle served", bundles: iss.bundlesResponse(t)},
		{name: "no bundle yet", bundles: nil, wantCode: codes.Unavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeJWTSource(t, iss)
			src.bundles = tc.bundles
			srv := startJWTServer(t, unixOnly, src)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			set, err := newClient(t, srv.path).FetchJWTBundles(ctx)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("status code = %v (%v), want %v", got, err, tc.wantCode)
			}
			if tc.wantCode != codes.OK {
				return
			}
			b, ok := set.Get(td)
			if !ok || !b.HasJWTAuthority("k1") {
				t.Errorf("bundles = %v, want %s with kid k1", set.Bundles(), td)
			}
		})
	}
}

// jwtWatcher forwards the kids of each JWT bundle update.
type jwtWatcher struct{ kids chan []string }

func (w jwtWatcher) OnJWTBundlesUpdate(s *jwtbundle.Set) {
	var kids []string
	if b, ok := s.Get(td); ok {
		for kid := range b.JWTAuthorities() {
			kids = append(kids, kid)
		}
	}
	slices.Sort(kids)
	w.kids <- kids
}
func (w jwtWatcher) OnJWTBundlesWatchError(error) {}

func TestWatchJWTBundlesSeesRotation(t *testing.T) {
	iss := newJWTIssuer(t, "k1")
	src := newFakeJWTSource(t, iss)
	srv := startJWTServer(t, unixOnly, src)
	ctx, cancel := context.WithCancel(context.Background())
	w := jwtWatcher{kids: make(chan []string, 4)}
	done := make(chan error, 1)
	go func() { done <- newClient(t, srv.path).WatchJWTBundles(ctx, w) }()
	defer func() { cancel(); <-done }()
	next := func() []string {
		t.Helper()
		select {
		case kids := <-w.kids:
			return kids
		case <-time.After(10 * time.Second):
			t.Fatal("no JWT bundle update within 10s")
			return nil
		}
	}
	if got := next(); !slices.Equal(got, []string{"k1"}) {
		t.Fatalf("first bundle kids = %v, want [k1]", got)
	}
	// The next key is published next to the current one before use.
	if err := iss.bundle.AddJWTAuthority("k2", newECKey(t).Public()); err != nil {
		t.Fatal(err)
	}
	src.setBundles(iss.bundlesResponse(t), iss.set())
	if got := next(); !slices.Equal(got, []string{"k1", "k2"}) {
		t.Fatalf("second bundle kids = %v, want [k1 k2]", got)
	}
}

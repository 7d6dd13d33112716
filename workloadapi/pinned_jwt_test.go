package workloadapi

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testwait"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// gatedJWTSource is a fakeJWTSource whose minting, once gated, says so on
// minting and waits for release: a mint that waits on the signer.
type gatedJWTSource struct {
	*fakeJWTSource
	gate atomic.Pointer[mintGate]
}

type mintGate struct{ minting, release chan struct{} }

func (s *gatedJWTSource) JWTSVIDs(ctx context.Context, selectors []string, spiffeID string, audience []string) ([]*workload.JWTSVID, error) {
	if g := s.gate.Load(); g != nil {
		close(g.minting)
		select {
		case <-g.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s.fakeJWTSource.JWTSVIDs(ctx, selectors, spiffeID, audience)
}

// fetchJWTOver makes one FetchJWTSVID call over the connection in f.
func fetchJWTOver(t *testing.T, f *os.File) (*workload.JWTSVIDResponse, error) {
	cc, err := clientOver(f)
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, securityHeader, "true")
	return workload.NewSpiffeWorkloadAPIClient(cc).FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"db"}})
}

// TestJWTBoundToConnectingProcess: a JWT-SVID goes only to the process that
// connected, as it was then: not to whoever holds its connection once it
// exec'd, whether before the call or while the token was being minted.
func TestJWTBoundToConnectingProcess(t *testing.T) {
	needRoot(t)
	exe, _ := helperCopies(t)
	sleep := sleepBinary(t)
	dir := socketDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	jwts := &gatedJWTSource{fakeJWTSource: newFakeJWTSource(t, newJWTIssuer(t, "k1"))}
	jwts.entitle("unix:path:"+exe, "spiffe://example.org/owner")
	jwts.entitle("unix:path:"+sleep, "spiffe://example.org/sleep")
	srv := startServerWith(t, Config{
		SocketPath: filepath.Join(dir, "w.sock"), Attestor: newWorkloadAttestor(t),
		Source: newRotatingSource(t, nil, nil), JWT: jwts,
	})
	const reason = "the caller ran another executable since it connected"

	tests := []struct {
		name       string
		duringMint bool // exec while the token is minted, not before the call
	}{
		{name: "exec before the call"},
		{name: "exec while minting", duringMint: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			f := os.NewFile(uintptr(fd), "conn")
			defer f.Close()
			owner := startChild(t, exe, "owner", srv.path, &syscall.Credential{Uid: 65534, Gid: 65534}, f)
			if l := owner.next(t); l != "ready" {
				t.Fatalf("owner said %q, want ready", l)
			}
			execSleep := func() {
				owner.say(t, "exec")
				testwait.Exe(t, owner.cmd.Process.Pid, sleep)
			}

			type result struct {
				resp *workload.JWTSVIDResponse
				err  error
			}
			done := make(chan result, 1)
			gate := &mintGate{minting: make(chan struct{}), release: make(chan struct{})}
			if tc.duringMint {
				jwts.gate.Store(gate)
				defer jwts.gate.Store(nil)
			} else {
				execSleep()
			}
			go func() {
				resp, err := fetchJWTOver(t, f)
				done <- result{resp, err}
			}()
			if tc.duringMint {
				<-gate.minting
				execSleep()
				close(gate.release)
			}
			r := <-done
			if st := status.Convert(r.err); st.Code() != codes.PermissionDenied || st.Message() != "no identity issued: "+reason {
				var ids []string
				for _, s := range r.resp.GetSvids() {
					ids = append(ids, s.GetSpiffeId())
				}
				t.Fatalf("FetchJWTSVID = tokens for %v, %v; want PermissionDenied: no identity issued: %s", ids, r.err, reason)
			}
			srv.logs.waitForLine(t, `"@message":"no identity issued"`, `"reason":"`+reason+`"`,
				`"pid":`+strconv.Itoa(owner.cmd.Process.Pid)+`,`, `"exe":"`+sleep+`"`)
		})
	}
}

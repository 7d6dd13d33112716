//go:build cgo

package signer

import (
	"context"
	"crypto/x509"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// floodStreams is how many Attest streams the flood opens, all on
	// one connection, none sending anything.
	floodStreams = 2000
	// floodWorkers open them, each one stream at a time.
	floodWorkers = 48
)

// TestAttestFlood: one connection opens floodStreams Attest streams that
// send nothing. Beyond the per-address cap they are refused at once
// (ResourceExhausted); those admitted end at the first-message timeout
// (DeadlineExceeded); an agent on another address attests with its TPM
// meanwhile; the signer never holds more streams than its caps, and after
// the flood its goroutines are back where they were. The refusals cost a
// few log lines, not one each.
func TestAttestFlood(t *testing.T) {
	a := newSimAgent(t)
	tpm := a.tpm
	// The agent's evidence is made before it dials, as the agent does.
	sess, err := tpm.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	ev, err := sess.Evidence()
	if err != nil {
		t.Fatal(err)
	}

	const perAddress = 16
	s := serveTestSigner(t, "node \"lab\" {\n  ek_sha256 = [\""+a.ek+"\"]\n}\n", `limits {
  attest_first_message_timeout         = "2s"
  max_pending_attestations             = 64
  max_pending_attestations_per_address = 16
  max_streams_per_connection           = 64
}
`)
	runtime.GC()
	goroutines0 := runtime.NumGoroutine()

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	floodConn := s.dialAs(t, "127.0.0.1", nil)
	flood := signerpb.NewSignerClient(floodConn)
	var opened atomic.Int64
	var mu sync.Mutex
	got := map[codes.Code]int{}
	var firstTimeout string
	var wg sync.WaitGroup
	for range floodWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for opened.Add(1) <= floodStreams {
				st, err := flood.Attest(ctx)
				if err == nil {
					_, err = st.Recv()
				}
				code, msg := status.Code(err), status.Convert(err).Message()
				mu.Lock()
				got[code]++
				if code == codes.DeadlineExceeded && firstTimeout == "" {
					firstTimeout = msg
				}
				mu.Unlock()
			}
		}()
	}

	// While the flood holds its address's every slot, an agent on another
	// address attests.
	eventually(t, "the flood to fill its address's slots", func() bool {
		s.gate.mu.Lock()
		defer s.gate.mu.Unlock()
		return s.gate.byAddr["127.0.0.1"] == perAddress
	})
	agentConn := s.dialAs(t, "127.0.0.2", nil)
	if _, err := attestSim(ctx, signerpb.NewSignerClient(agentConn), sess, ev); err != nil {
		t.Errorf("agent attesting during the flood: %v", err)
	}
	wg.Wait()
	t.Logf("flood streams ended with %v", got)

	if n := got[codes.ResourceExhausted] + got[codes.DeadlineExceeded]; n != floodStreams {
		t.Errorf("flood streams ended with %v; want only ResourceExhausted and DeadlineExceeded, %d in all", got, floodStreams)
	}
	if got[codes.ResourceExhausted] == 0 || got[codes.DeadlineExceeded] == 0 {
		t.Errorf("flood streams ended with %v; want both refusals (over the cap) and timeouts (admitted, no evidence)", got)
	}
	if !strings.Contains(firstTimeout, "limits.attest_first_message_timeout") {
		t.Errorf("timed-out stream's message %q does not name the limit", firstTimeout)
	}
	// Count-based bounds: what the signer held at once, and what is left.
	if _, peak := s.gate.inFlight(); peak > perAddress+1 {
		t.Errorf("peak attestations in flight = %d, want at most %d (the flood's cap and the agent)", peak, perAddress+1)
	}
	eventually(t, "the flood's streams to end", func() bool { n, _ := s.gate.inFlight(); return n == 0 })
	// Every stream and handler is gone once the connections close: what
	// is left is the baseline, give or take transport goroutines winding
	// down (polled) and the race detector's own.
	floodConn.Close()
	agentConn.Close()
	eventually(t, "goroutines back to the baseline", func() bool { return runtime.NumGoroutine() <= goroutines0+4 })
	if got := testutil.ToFloat64(s.metrics.attestations.WithLabelValues("ok")); got != 1 {
		t.Errorf("attestations_total{result=\"ok\"} = %v, want 1", got)
	}
	// One warning per source and interval, not one per refusal.
	lines := 0
	for l := range strings.Lines(s.logs.String()) {
		if strings.Contains(l, `"@level":"warn"`) {
			lines++
		}
	}
	t.Logf("%d warning lines", lines)
	if lines > 6 {
		t.Errorf("%d warning lines for %d refused streams, want a handful:\n%s", lines, floodStreams, s.logs)
	}
}

// attestSim runs one attestation on c with the simulator's session and
// evidence, as the agent's upstream does, and returns the agent SVID.
func attestSim(ctx context.Context, c signerpb.SignerClient, sess *node.Session, ev *node.Evidence) (*x509svid.SVID, error) {
	stream, err := c.Attest(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_Evidence{Evidence: &signerpb.Evidence{
		EkCertificate: ev.EKCertificate,
		EkPublic:      ev.EKPublic,
		Ak:            &signerpb.TPMObject{Public: ev.AK.Public, CreateData: ev.AK.CreateData, CreateAttestation: ev.AK.CreateAttestation, CreateSignature: ev.AK.CreateSignature},
		Key:           &signerpb.TPMObject{Public: ev.Key.Public, CreateData: ev.Key.CreateData, CreateAttestation: ev.Key.CreateAttestation, CreateSignature: ev.Key.CreateSignature},
		Csr:           ev.CSR,
	}}}); err != nil {
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	ch := resp.GetChallenge()
	secret, err := sess.Activate(attest.EncryptedCredential{Credential: ch.GetCredential(), Secret: ch.GetSecret()})
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_ActivationSecret{ActivationSecret: secret}}); err != nil {
		return nil, err
	}
	resp, err = stream.Recv()
	if err != nil {
		return nil, err
	}
	if len(resp.GetResult().GetSvid()) == 0 {
		return nil, status.Error(codes.Internal, "no SVID in the result")
	}
	cert, err := x509.ParseCertificate(resp.GetResult().GetSvid()[0])
	if err != nil {
		return nil, err
	}
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: sess.Signer()}, nil
}

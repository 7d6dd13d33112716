//go:build cgo

package signer_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// openSeeded opens the simulator with a fixed seed: the same seed gives
// the same EK, so the EK can be pinned before the agent attests.
func openSeeded(b *testing.B, seed int64) *node.TPM {
	b.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		b.Fatalf("start simulator: %v", err)
	}
	tpm, err := node.OpenTPMChannel(sim)
	if err != nil {
		sim.Close()
		b.Fatalf("OpenTPMChannel: %v", err)
	}
	return tpm
}

// syncWatch counts, for the entry count it is armed with, how many streams
// have received a Sync message with that many entries.
type syncWatch struct {
	mu        sync.Mutex
	want      int
	remaining int
	last      time.Time
	reached   chan struct{}
	counted   []int // per stream, the entry count it was last counted for
	failed    chan error
}

func (w *syncWatch) arm(want, streams int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.want, w.remaining, w.reached = want, streams, make(chan struct{})
}

func (w *syncWatch) note(i, entries int, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if entries != w.want || w.counted[i] == entries {
		return
	}
	w.counted[i] = entries
	w.last = at
	if w.remaining--; w.remaining == 0 {
		close(w.reached)
	}
}

// wait returns when the last stream was counted.
func (w *syncWatch) wait() (time.Time, error) {
	w.mu.Lock()
	reached := w.reached
	w.mu.Unlock()
	select {
	case <-reached:
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.last, nil
	case err := <-w.failed:
		return time.Time{}, err
	case <-time.After(scaleTimeout):
		w.mu.Lock()
		defer w.mu.Unlock()
		return time.Time{}, fmt.Errorf("%d streams lack the edit after %v", w.remaining, scaleTimeout)
	}
}

// attestAgent attests the TPM with the signer, as the agent's upstream
// does, and returns the agent SVID whose key stays in the TPM.
func attestAgent(b *testing.B, ctx context.Context, s *scaleSigner, tpm *node.TPM, ekHash string) *x509svid.SVID {
	b.Helper()
	sess, err := tpm.NewSession()
	if err != nil {
		b.Fatalf("NewSession: %v", err)
	}
	ev, err := sess.Evidence()
	if err != nil {
		b.Fatalf("Evidence: %v", err)
	}
	signerID := spiffeid.RequireFromSegments(scaleTD, "lanyard", "signer")
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.TLSClientConfig(s.trust, tlsconfig.AuthorizeID(signerID)))))
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	stream, err := signerpb.NewSignerClient(cc).Attest(ctx)
	if err != nil {
		b.Fatalf("Attest: %v", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_Evidence{Evidence: &signerpb.Evidence{
		EkCertificate: ev.EKCertificate,
		EkPublic:      ev.EKPublic,
		Ak:            &signerpb.TPMObject{Public: ev.AK.Public, CreateData: ev.AK.CreateData, CreateAttestation: ev.AK.CreateAttestation, CreateSignature: ev.AK.CreateSignature},
		Key:           &signerpb.TPMObject{Public: ev.Key.Public, CreateData: ev.Key.CreateData, CreateAttestation: ev.Key.CreateAttestation, CreateSignature: ev.Key.CreateSignature},
		Csr:           ev.CSR,
	}}}); err != nil {
		b.Fatalf("send evidence: %v", err)
	}
	resp, err := stream.Recv()
	if err != nil || resp.GetChallenge() == nil {
		b.Fatalf("challenge: %v %v", resp, err)
	}
	secret, err := sess.Activate(attest.EncryptedCredential{Credential: resp.GetChallenge().GetCredential(), Secret: resp.GetChallenge().GetSecret()})
	if err != nil {
		b.Fatalf("Activate: %v", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_ActivationSecret{ActivationSecret: secret}}); err != nil {
		b.Fatalf("send answer: %v", err)
	}
	if resp, err = stream.Recv(); err != nil || len(resp.GetResult().GetSvid()) == 0 {
		b.Fatalf("attest result: %v %v", resp, err)
	}
	leaf, err := x509.ParseCertificate(resp.GetResult().GetSvid()[0])
	if err != nil {
		b.Fatal(err)
	}
	return &x509svid.SVID{ID: spiffeid.RequireFromPath(scaleTD, "/lanyard/agent/tpm/"+ekHash), Certificates: []*x509.Certificate{leaf}, PrivateKey: sess.Signer()}
}

// BenchmarkSignerScale: see scale_child_test.go and the file comment of
// scale_bench_test.go. Metrics:
//
//	agents, tpms                 Sync streams held, distinct TPMs (agent IDs) behind them
//	edits                        policy edits timed
//	attest-ms                    median wall time of one attestation, TPM (simulator) work included
//	edit-last-p50-ms, -p99-ms    policy edit (reload: read, parse, SetPolicy) until the last stream has it
//	signer-rss-idle-mib          signer RSS before any agent
//	signer-rss-mib               signer RSS holding every stream, after the edits
//	signer-cpu-ms/edit           signer user+sys CPU per edit (10 ms ticks)
func BenchmarkSignerScale(b *testing.B) {
	agents := envInt(b, "LANYARD_SCALE_AGENTS", 1000)
	tpms := min(envInt(b, "LANYARD_SCALE_TPMS", 100), agents)
	dir := b.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	eks := make([]string, tpms)
	for i := range eks {
		tpm := openSeeded(b, int64(i+1))
		info, err := tpm.Info()
		if err != nil {
			b.Fatalf("Info: %v", err)
		}
		eks[i] = info.EKSHA256
		tpm.Close()
	}
	policyPath := filepath.Join(dir, "policy.hcl")
	if err := os.WriteFile(policyPath, []byte(scalePolicy(eks, 0)), 0o600); err != nil {
		b.Fatal(err)
	}
	sig := startScaleSigner(b, dir)
	rssIdle, _ := sig.usage(b)

	w := &syncWatch{counted: make([]int, agents), failed: make(chan error, agents)}
	w.arm(scaleWorkloads, agents)
	var conns []*grpc.ClientConn
	var wg sync.WaitGroup
	defer func() {
		cancel()
		for _, cc := range conns {
			cc.Close()
		}
		wg.Wait()
	}()
	signerID := spiffeid.RequireFromSegments(scaleTD, "lanyard", "signer")
	var attests []time.Duration
	for t := range tpms {
		tpm := openSeeded(b, int64(t+1))
		t0 := time.Now()
		svid := attestAgent(b, ctx, sig, tpm, eks[t])
		attests = append(attests, time.Since(t0))
		// This TPM's share of the streams; each connection's handshake
		// signs with the TPM key, so all happen before the TPM closes.
		for i := t * agents / tpms; i < (t+1)*agents/tpms; i++ {
			cc, err := grpc.NewClient(sig.addr, grpc.WithTransportCredentials(credentials.NewTLS(
				tlsconfig.MTLSClientConfig(svid, sig.trust, tlsconfig.AuthorizeID(signerID)))))
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, cc)
			stream, err := signerpb.NewSignerClient(cc).Sync(ctx, &signerpb.SyncRequest{})
			if err != nil {
				b.Fatalf("Sync %d: %v", i, err)
			}
			first, err := stream.Recv()
			if err != nil {
				b.Fatalf("Sync %d first message: %v", i, err)
			}
			w.note(i, len(first.GetEntries()), time.Now())
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					msg, err := stream.Recv()
					if err != nil {
						if ctx.Err() == nil {
							w.failed <- fmt.Errorf("stream %d: %w", i, err)
						}
						return
					}
					w.note(i, len(msg.GetEntries()), time.Now())
				}
			}()
		}
		tpm.Close()
	}
	if _, err := w.wait(); err != nil {
		b.Fatalf("first sync: %v", err)
	}

	var lasts []time.Duration
	_, cpu0 := sig.usage(b)
	b.ResetTimer()
	for e := 1; e <= scaleEdits; e++ {
		if err := os.WriteFile(policyPath, []byte(scalePolicy(eks, e)), 0o600); err != nil {
			b.Fatal(err)
		}
		w.arm(scaleWorkloads+e, agents)
		t0 := time.Now()
		if err := sig.reload(); err != nil {
			b.Fatalf("edit %d: %v", e, err)
		}
		last, err := w.wait()
		if err != nil {
			b.Fatalf("edit %d: %v", e, err)
		}
		lasts = append(lasts, last.Sub(t0))
	}
	b.StopTimer()
	rss, cpu1 := sig.usage(b)
	slices.Sort(lasts)
	slices.Sort(attests)
	b.ReportMetric(float64(agents), "agents")
	b.ReportMetric(float64(tpms), "tpms")
	b.ReportMetric(scaleEdits, "edits")
	b.ReportMetric(msOf(attests[len(attests)/2]), "attest-ms")
	b.ReportMetric(msOf(lasts[len(lasts)/2]), "edit-last-p50-ms")
	b.ReportMetric(msOf(lasts[len(lasts)-1]), "edit-last-p99-ms")
	b.ReportMetric(rssIdle, "signer-rss-idle-mib")
	b.ReportMetric(rss, "signer-rss-mib")
	b.ReportMetric(msOf(cpu1-cpu0)/scaleEdits, "signer-cpu-ms/edit")
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

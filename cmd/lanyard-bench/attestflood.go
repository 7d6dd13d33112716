package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

const (
	// attestFloodTimeout bounds the whole flood: streams still open then are
	// cancelled and reported as "open at the cut". With the default
	// limits the flood lasts about attest_first_message_timeout (5 s).
	attestFloodTimeout = 15 * time.Second
	// rssSampleEvery is how often the signer's VmRSS is read meanwhile.
	rssSampleEvery = 50 * time.Millisecond
)

// floodPhase starts a signer alone and opens n Attest streams that send
// nothing, all on one TLS connection, as an unauthenticated network peer
// can: the signer's RSS idle, at its peak during the flood, and after.
func (w *suiteRun) floodPhase(n int) ([]row, error) {
	w.stopAll()
	if err := w.startSigner("flood", policyFor(w.cfg.EKCA, w.uid, 1, "1h")); err != nil {
		return nil, err
	}
	defer w.stopAll()
	pid := w.signer.pid()
	idle, err := settledRSS(pid)
	if err != nil {
		return nil, err
	}
	peak, ended, err := attestFlood(fmt.Sprintf("127.0.0.1:%d", w.port), filepath.Join(w.cfg.Dir, "bundle.pem"), pid, n)
	if err != nil {
		return nil, err
	}
	after, err := settledRSS(pid)
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("signer RSS under %d Attest streams sending nothing, one connection", n)
	return []row{
		singleRow("signer RSS idle, no agent", "MiB", 1, idle, "VmRSS"),
		singleRow(name, "MiB", n, peak, "peak VmRSS, sampled every 50 ms; streams: "+ended),
		singleRow("signer RSS after the Attest flood", "MiB", 1, after, "VmRSS"),
	}, nil
}

// attestFlood opens n Attest streams on one connection to the signer at
// addr, trusted by the bundle at bundlePath, reading pid's VmRSS as it
// goes. It returns the peak RSS in MiB and how the streams ended, by code.
func attestFlood(addr, bundlePath string, pid, n int) (peak float64, ended string, err error) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	trust, err := x509bundle.Load(td, bundlePath)
	if err != nil {
		return 0, "", fmt.Errorf("attest flood: %w", err)
	}
	signerID := spiffeid.RequireFromSegments(td, "lanyard", "signer")
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.TLSClientConfig(trust, tlsconfig.AuthorizeID(signerID)))))
	if err != nil {
		return 0, "", fmt.Errorf("attest flood: %w", err)
	}
	defer cc.Close()
	client := signerpb.NewSignerClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), attestFloodTimeout)
	defer cancel()

	done := make(chan struct{})
	sampled := make(chan float64, 1)
	go func() {
		var top float64
		t := time.NewTicker(rssSampleEvery)
		defer t.Stop()
		for {
			if v, err := vmRSS(pid); err == nil {
				top = max(top, v)
			}
			select {
			case <-done:
				sampled <- top
				return
			case <-t.C:
			}
		}
	}()

	// Every stream at once, as the attack does: gRPC holds back those
	// beyond the signer's streams per connection until others end.
	var mu sync.Mutex
	byOutcome := map[string]int{}
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := client.Attest(ctx)
			if err == nil {
				_, err = st.Recv()
			}
			outcome := status.Code(err).String()
			if ctx.Err() != nil {
				outcome = "open at the cut"
			}
			mu.Lock()
			byOutcome[outcome]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(done)
	return <-sampled, outcomes(byOutcome), nil
}

// outcomes is "ResourceExhausted 19936, DeadlineExceeded 64", largest first.
func outcomes(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return m[keys[i]] > m[keys[j]] })
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

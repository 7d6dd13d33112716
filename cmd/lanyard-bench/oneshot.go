package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// callTimeout bounds one call: a call that takes longer is a failure, not
// a slow sample.
const callTimeout = 10 * time.Second

// workloadCtx carries the header every Workload API call must have.
func workloadCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

// dial opens a client connection to a Unix socket. Like a workload that
// starts, asks once and exits, nothing is shared between calls.
func dial(socket string) (*grpc.ClientConn, error) {
	cc, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	return cc, nil
}

// oneShot dials, takes the first FetchX509SVID response and hangs up: the
// call a short-lived workload makes. The raw gRPC client is used (not
// go-spiffe's), so the client's own parsing of the SVID is not counted,
// for the agent and the floor alike.
func oneShot(ctx context.Context, socket string) (*workload.X509SVIDResponse, error) {
	ctx, cancel := context.WithTimeout(workloadCtx(ctx), callTimeout)
	defer cancel()
	cc, err := dial(socket)
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return nil, fmt.Errorf("FetchX509SVID: %w", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("FetchX509SVID first response: %w", err)
	}
	if len(resp.GetSvids()) == 0 {
		return nil, errors.New("FetchX509SVID: response without SVIDs")
	}
	return resp, nil
}

// sequential runs n one-shot calls one after the other and returns their
// latencies.
func sequential(ctx context.Context, socket string, n int) ([]time.Duration, error) {
	ds := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if _, err := oneShot(ctx, socket); err != nil {
			return ds, fmt.Errorf("call %d of %d: %w", i+1, n, err)
		}
		ds = append(ds, time.Since(t0))
	}
	return ds, nil
}

// sequentialPair runs n one-shot calls against each of a and b, taking
// turns call by call (and swapping who goes first each time), so both see
// the same load from the rest of the machine.
func sequentialPair(ctx context.Context, a, b string, n int) ([]time.Duration, []time.Duration, error) {
	da := make([]time.Duration, 0, n)
	db := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		order := []string{a, b}
		if i%2 == 1 {
			order = []string{b, a}
		}
		for _, socket := range order {
			t0 := time.Now()
			if _, err := oneShot(ctx, socket); err != nil {
				return da, db, fmt.Errorf("call %d of %d to %s: %w", i+1, n, socket, err)
			}
			if socket == a {
				da = append(da, time.Since(t0))
			} else {
				db = append(db, time.Since(t0))
			}
		}
	}
	return da, db, nil
}

// concurrentResult is what clients one-shot calls in a loop achieved.
type concurrentResult struct {
	calls     int
	elapsed   time.Duration
	latencies []time.Duration
}

func (r concurrentResult) perSecond() float64 { return float64(r.calls) / r.elapsed.Seconds() }

// concurrent runs clients workers, each making one-shot calls back to back,
// for at most d and at most maxCalls calls in all.
func concurrent(ctx context.Context, socket string, clients int, d time.Duration, maxCalls int) (concurrentResult, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var (
		issued atomic.Int64
		mu     sync.Mutex
		lat    []time.Duration
		first  error
		wg     sync.WaitGroup
	)
	t0 := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for ctx.Err() == nil && issued.Add(1) <= int64(maxCalls) {
				s := time.Now()
				if _, err := oneShot(context.Background(), socket); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					cancel()
					break
				}
				mine = append(mine, time.Since(s))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res := concurrentResult{calls: len(lat), elapsed: time.Since(t0), latencies: lat}
	if first != nil {
		return res, fmt.Errorf("%d concurrent clients: %w", clients, first)
	}
	return res, nil
}

// concurrentPair runs concurrent against a and b in two halves each, in the
// order a b b a, so a change of load on the machine falls on both alike.
func concurrentPair(ctx context.Context, a, b string, clients int, d time.Duration, maxCalls int) (concurrentResult, concurrentResult, error) {
	var ra, rb concurrentResult
	for _, socket := range []string{a, b, b, a} {
		r, err := concurrent(ctx, socket, clients, d/2, maxCalls/2)
		if err != nil {
			return ra, rb, fmt.Errorf("%s: %w", socket, err)
		}
		acc := &rb
		if socket == a {
			acc = &ra
		}
		acc.calls += r.calls
		acc.elapsed += r.elapsed
		acc.latencies = append(acc.latencies, r.latencies...)
	}
	return ra, rb, nil
}

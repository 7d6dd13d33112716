package main

import (
	"bytes"
	"context"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
)

func TestGoBenchRows(t *testing.T) {
	out := `goos: linux
BenchmarkSignX509SVID 	    4044	    250000 ns/op
BenchmarkEntryMatching/entries=1000/warm 	14039220	        90.00 ns/op	      80 B/op	       1 allocs/op
BenchmarkSignerScale-2   	       1	 977259251 ns/op	      1000 agents	       130.6 attest-ms	       185.9 edit-last-p50-ms	       257.3 edit-last-p99-ms	        5.000 edits	       108.0 signer-cpu-ms/edit	        20.82 signer-rss-idle-mib	       126.0 signer-rss-mib	       100.0 tpms	        40.5 signer-start-ms	       900.0 resync-p50-ms	      1800 resync-p99-ms	        95.1 resync-own-p50-ms	       116.1 resync-own-p99-ms	        10.00 revokes	         1.6 revoke-p50-ms	         2.7 revoke-p99-ms	         5.000 token-revokes	       122.5 token-revoke-p50-ms	       149.9 token-revoke-p99-ms
BenchmarkSignerTier-2   	       1	 869797376 ns/op	      1000 agents	         5.000 applies	       166.4 apply-p50-ms	       201.4 apply-p99-ms	         0 etcd-writes/s	        33.00 kill-etcd-writes	       135.7 kill-resync-own-p50-ms	       385.8 kill-resync-own-p99-ms	      3019 kill-resync-p50-ms	      5557 kill-resync-p99-ms	       334.0 moved	         9.000 reattests	        40.00 replica-cpu-ms/apply	        25.56 replica-cpu-ms/attest	        75.12 replica-rss-mib	         3.000 replicas	        99.00 tpms
PASS
`
	path := filepath.Join(t.TempDir(), "bench.txt")
	if err := os.WriteFile(path, []byte(out), 0o600); err != nil {
		t.Fatal(err)
	}
	rows, err := goBenchRows(path)
	if err != nil {
		t.Fatal(err)
	}
	type fig struct {
		Name   string
		N      int
		Median float64
		P99    string
		Unit   string
	}
	var got []fig
	for _, r := range rows {
		got = append(got, fig{r.Name, r.N, math.Round(r.Median*1000) / 1000, num(r.P99), r.Unit})
	}
	want := []fig{
		{"BenchmarkSignX509SVID", 4044, 250, "-", "µs/op"},
		{"BenchmarkEntryMatching/entries=1000/warm", 14039220, 0.09, "-", "µs/op"},
		{"signer: policy edit reaches 1000 agents' Sync streams", 5, 185.9, "257.3", "ms"},
		{"signer: CPU per policy edit", 5, 108, "-", "ms"},
		{"signer: RSS idle", 1, 20.82, "-", "MiB"},
		{"signer: RSS with 1000 agents' Sync streams", 1, 126, "-", "MiB"},
		{"signer: one attestation, wall time", 100, 130.6, "-", "ms"},
		{"signer: start after kill -9", 1, 40.5, "-", "ms"},
		{"signer: restart to 1000 agents re-synced", 1000, 900, "1800", "ms"},
		{"signer: restart, one agent's re-sync once its TPM is free", 1000, 95.1, "116.1", "ms"},
		{"signer: token revoke reaches 1000 agents' Sync streams", 5, 122.5, "149.9", "ms"},
		{"signer: node revoke to the agent's Sync closed", 10, 1.6, "2.700", "ms"},
		{"signer tier: policy apply reaches 1000 agents on 3 replicas", 5, 166.4, "201.4", "ms"},
		{"signer tier: CPU per policy apply, busiest replica", 5, 40, "-", "ms"},
		{"signer tier: RSS per replica with about 333 agents' Sync streams", 3, 75.12, "-", "MiB"},
		{"signer tier: CPU per re-attestation, serving replica", 9, 25.56, "-", "ms"},
		{"signer tier: etcd writes at steady state", 1, 0, "-", "writes/s"},
		{"signer tier: replica killed to its agents re-synced on others", 334, 3019, "5557", "ms"},
		{"signer tier: one agent's fail-over once its TPM is free", 334, 135.7, "385.8", "ms"},
		{"signer tier: etcd writes of that fail-over", 1, 33, "-", "writes"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("rows (-want +got):\n%s", diff)
	}
	if rows[0].Note != "4000/s per core" {
		t.Errorf("signing note = %q, want the rate per core", rows[0].Note)
	}
}

func TestPerConnection(t *testing.T) {
	tests := []struct {
		name  string
		n     int
		limit uint64
		want  int
	}{
		{"fits one per connection", 10000, 1 << 20, 1},
		{"just fits", 1000, 3024, 1},
		{"two per connection", 10000, 20000, 2},
		{"limit below the reserve", 10, 512, 10},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := perConnection(tc.n, tc.limit); got != tc.want {
				t.Errorf("perConnection(%d, %d) = %d, want %d", tc.n, tc.limit, got, tc.want)
			}
		})
	}
}

func TestDurationRow(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	r := durationRow("x", ds, "")
	if r.N != 100 || r.Min != 1 || r.Median != 50 || r.P99 != 99 {
		t.Errorf("row N=%d min=%v median=%v p99=%v, want 100, 1, 50, 99", r.N, r.Min, r.Median, r.P99)
	}
	if empty := durationRow("none", nil, ""); empty.N != 0 || !math.IsNaN(empty.Median) {
		t.Errorf("empty row = %+v, want N 0 and no median", empty)
	}
}

// TestFloorServesTheResponse runs the floor on a socket and fetches from it
// with the client the benchmark uses: the same bytes come back, and a call
// without the security header is refused as the agent refuses it.
func TestFloorServesTheResponse(t *testing.T) {
	want := &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId: "spiffe://example.org/x", X509Svid: []byte("chain"), X509SvidKey: []byte("not a key"), Bundle: []byte("bundle"),
	}}}
	b, err := proto.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "ly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "f.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready, rw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveFloor(ctx, socket, bytes.NewReader(b), rw) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serveFloor: %v", err)
		}
	})
	buf := make([]byte, 16)
	if n, err := ready.Read(buf); err != nil || string(buf[:n]) != "ready\n" {
		t.Fatalf("floor said %q, %v; want ready", buf[:n], err)
	}

	got, err := oneShot(context.Background(), socket)
	if err != nil {
		t.Fatalf("oneShot: %v", err)
	}
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("response (-want +got):\n%s", diff)
	}

	cc, err := dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(context.Background(), &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("call without the header: %v, want InvalidArgument", err)
	}
}

func TestPrintGoals(t *testing.T) {
	seq := durationRow("one-shot FetchX509SVID, sequential", []time.Duration{time.Millisecond, 2 * time.Millisecond, 900 * time.Microsecond}, "")
	seq.Floor, seq.FloorP99 = 0.8, 1.5
	rate := singleRow("one-shot calls/s, 32 clients", "calls/s", 100, 950, "")
	rate.Floor = 1000
	rows := []row{
		seq, rate,
		singleRow("agent RSS idle, 1 entry", "MiB", 1, 20.9, ""),
		// "RSS per 1,000 open streams" left out: not measured this run.
	}
	var b bytes.Buffer
	printGoals(&b, rows)
	// Columns are aligned with two or more spaces; compare cells.
	got := regexp.MustCompile(` {2,}`).ReplaceAllString(b.String(), "|")
	for _, want := range []string{
		// median 1 ms over a floor of 0.8: x1.25 > x1.15
		"one-shot p50, ratio to the floor|x1.25|-|<= x1.15|no",
		"one-shot p99|2.00 ms|1.50 ms|<= 1.20 ms|no",
		"32 concurrent clients, calls/s as share of the floor|x0.95|-|>= x0.90|yes",
		"RSS idle|20.9 MiB|-|<= 16.0 MiB|no",
		"RSS per 1,000 open streams|not measured|-|<= 12.0 MiB|-",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("goals summary lacks %q:\n%s", want, got)
		}
	}
}

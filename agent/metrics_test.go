package agent

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
)

func testAgent() *Agent {
	return New(&Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), SignerAddresses: []string{"127.0.0.1:1"}}, nil)
}

func TestMetrics(t *testing.T) {
	a := testAgent()
	m := a.metrics

	// Nothing held yet: no expiry to report.
	if n, err := testutil.GatherAndCount(m.reg, "lanyard_agent_earliest_svid_expiry_seconds"); err != nil || n != 0 {
		t.Errorf("earliest_svid_expiry_seconds with no SVID: %d series (%v), want none", n, err)
	}

	now := time.Now()
	a.cache.setEntries([]*entry{testEntry("late", 1, "unix:uid:1"), testEntry("early", 1, "unix:uid:1")})
	a.cache.putSVIDs([]*svid{
		testSVID(t, "late", 1, now.Add(-time.Minute), now.Add(time.Hour)),
		testSVID(t, "early", 1, now.Add(-time.Minute), now.Add(10*time.Minute)),
	})
	a.up.update(func(s *upstreamSnapshot) { s.SyncConnected = true })
	m.StreamOpened("FetchX509SVID")
	m.StreamOpened("FetchX509SVID")
	m.StreamOpened("FetchX509Bundles")
	m.StreamOpened("StreamSecrets") // Envoy SDS
	m.StreamClosed("FetchX509SVID")
	m.StreamOpened("NotAStream") // ignored
	m.CallDone("FetchX509SVID", codes.PermissionDenied)
	m.CallerAttested(300*time.Microsecond, true)
	m.svidsIssued.WithLabelValues("x509").Add(2)
	m.svidFailed(failRefused, 1)

	const want = `
# HELP lanyard_agent_open_streams Open Workload API streams by method.
# TYPE lanyard_agent_open_streams gauge
lanyard_agent_open_streams{method="FetchJWTBundles"} 0
lanyard_agent_open_streams{method="FetchX509Bundles"} 1
lanyard_agent_open_streams{method="FetchX509SVID"} 1
lanyard_agent_open_streams{method="StreamSecrets"} 1
# HELP lanyard_agent_signer_connected 1 while the sync stream to the signer is open and delivering, else 0.
# TYPE lanyard_agent_signer_connected gauge
lanyard_agent_signer_connected 1
# HELP lanyard_agent_svid_failures_total Workload SVIDs the agent tried and failed to get signed, by reason.
# TYPE lanyard_agent_svid_failures_total counter
lanyard_agent_svid_failures_total{reason="refused"} 1
# HELP lanyard_agent_svids_issued_total Workload SVIDs the signer signed for this agent, by kind.
# TYPE lanyard_agent_svids_issued_total counter
lanyard_agent_svids_issued_total{kind="x509"} 2
# HELP lanyard_agent_workload_api_calls_total Finished Workload API calls by method and gRPC code (a stream ends Canceled when its client hangs up).
# TYPE lanyard_agent_workload_api_calls_total counter
lanyard_agent_workload_api_calls_total{code="PermissionDenied",method="FetchX509SVID"} 1
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want),
		"lanyard_agent_open_streams", "lanyard_agent_signer_connected", "lanyard_agent_svid_failures_total",
		"lanyard_agent_svids_issued_total", "lanyard_agent_workload_api_calls_total"); err != nil {
		t.Error(err)
	}
	if got := a.Report(time.Now()).OpenStreams; got["FetchX509SVID"] != 1 || got["FetchX509Bundles"] != 1 || got["StreamSecrets"] != 1 || len(got) != 4 {
		t.Errorf("status open streams = %v, want FetchX509SVID 1, FetchX509Bundles 1, FetchJWTBundles 0 and StreamSecrets 1", got)
	}

	// Computed at scrape time from the earliest SVID: about 10 minutes.
	mfs, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var expiry float64 = -1
	for _, mf := range mfs {
		if mf.GetName() == "lanyard_agent_earliest_svid_expiry_seconds" {
			expiry = mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	if expiry < 9*60 || expiry > 10*60 {
		t.Errorf("earliest_svid_expiry_seconds = %v, want within (540, 600]", expiry)
	}
	if n := testutil.CollectAndCount(m.workloadAttestDuration); n != 1 {
		t.Errorf("workload_attestation_duration_seconds: %d series, want 1", n)
	}
}

func TestReadiness(t *testing.T) {
	synced := time.Now()
	tests := []struct {
		name   string
		r      Report
		want   bool
		reason string
	}{
		{"healthy", Report{Health: Healthy, Agent: AgentReport{SPIFFEID: "x"}, Signer: SignerReport{LastSync: &synced}}, true, "healthy"},
		{"degraded is ready", Report{Health: Degraded, Reasons: []string{"signer unreachable (sync stream down)"}, Agent: AgentReport{SPIFFEID: "x"}, Signer: SignerReport{LastSync: &synced}}, true, "degraded: signer unreachable (sync stream down)"},
		{"not attested", Report{Health: Unhealthy, Reasons: []string{"not attested", "signer unreachable (sync stream down)"}}, false, "not attested; signer unreachable (sync stream down)"},
		{"attested, never synced", Report{Health: Degraded, Agent: AgentReport{SPIFFEID: "x"}}, false, "not synced with the signer yet"},
		{"entry without SVID", Report{Health: Unhealthy, Reasons: []string{"1 entry has no valid SVID"}, Signer: SignerReport{LastSync: &synced}}, false, "1 entry has no valid SVID"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ok, reason := readiness(tt.r)
			if ok != tt.want || reason != tt.reason {
				t.Errorf("readiness = %v %q, want %v %q", ok, reason, tt.want, tt.reason)
			}
		})
	}
}

func TestHealthHandler(t *testing.T) {
	srv := httptest.NewServer(testAgent().healthHandler())
	defer srv.Close()
	tests := []struct {
		path     string
		wantCode int
		wantBody string
	}{
		{"/live", http.StatusOK, "ok\n"},
		{"/ready", http.StatusServiceUnavailable, "not ready: not attested; signer unreachable (sync stream down)\n"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + tt.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.wantCode || string(body) != tt.wantBody {
				t.Errorf("GET %s = %d %q, want %d %q", tt.path, resp.StatusCode, body, tt.wantCode, tt.wantBody)
			}
		})
	}
}

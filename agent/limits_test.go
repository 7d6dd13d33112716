package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestParseConfigLimits(t *testing.T) {
	const base = "trust_domain = \"example.org\"\nsigner_address = \"s:1\"\ntrust_bundle_path = \"b.pem\"\ntpm { socket = \"tpm.sock\" }\n"
	set := func(f func(*LimitsConfig)) LimitsConfig {
		l := DefaultLimits()
		f(&l)
		return l
	}
	tests := []struct {
		name string
		src  string
		want LimitsConfig
		errs []string
	}{
		{name: "defaults", src: base, want: DefaultLimits()},
		{name: "empty block", src: base + "limits {}\n", want: DefaultLimits()},
		{name: "every key", src: base + "limits {\n  max_streams_per_connection = 16\n  max_streams_per_uid = 64\n  max_connections_per_uid = 32\n  max_connections = 500\n  idle_connection_timeout = \"2s\"\n  warning_interval = \"1m\"\n}\n",
			want: LimitsConfig{MaxStreamsPerConn: 16, MaxStreamsPerUID: 64, MaxConnsPerUID: 32, MaxConns: 500, IdleConnTimeout: 2 * time.Second, WarningInterval: time.Minute}},
		{name: "one key", src: base + "limits { max_connections_per_uid = 8 }\n", want: set(func(l *LimitsConfig) { l.MaxConnsPerUID = 8 })},
		{name: "zero", src: base + "limits {\n  max_streams_per_connection = 0\n}\n",
			errs: []string{"a.hcl:6: max_streams_per_connection: 0 is not a whole number from 1 to 1073741824"}},
		{name: "fraction", src: base + "limits {\n  max_connections = 1.5\n}\n",
			errs: []string{"a.hcl:6: max_connections: 1.5 is not a whole number from 1 to 1073741824"}},
		{name: "string count", src: base + "limits {\n  max_streams_per_uid = \"10\"\n}\n",
			errs: []string{"a.hcl:6: max_streams_per_uid: expected a whole number, got string"}},
		{name: "bad duration", src: base + "limits {\n  idle_connection_timeout = \"10\"\n}\n",
			errs: []string{`a.hcl:6: idle_connection_timeout: invalid duration "10" (write it like "90s", "5m" or "1h")`}},
		{name: "duration too short", src: base + "limits {\n  warning_interval = \"10ms\"\n}\n",
			errs: []string{`a.hcl:6: warning_interval: 10ms is below the minimum of 1s`}},
		{name: "unknown key", src: base + "limits {\n  max_stream = 4\n}\n",
			errs: []string{`a.hcl:6: Unsupported argument: An argument named "max_stream" is not expected here.`}},
		{name: "two blocks", src: base + "limits {}\nlimits {}\n",
			errs: []string{"a.hcl:6: only one limits block is allowed (first at line 5)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := parseConfigCase(t, tt.src, tt.errs)
			if cfg == nil {
				return
			}
			if diff := cmp.Diff(tt.want, cfg.Limits); diff != "" {
				t.Errorf("limits (-want +got):\n%s", diff)
			}
		})
	}
}

func TestWorkloadLimits(t *testing.T) {
	derived, err := workloadapi.DefaultMaxConns()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DefaultLimits().workloadLimits()
	if err != nil {
		t.Fatal(err)
	}
	want := workloadapi.Limits{MaxStreamsPerConn: 128, MaxStreamsPerUID: 4096, MaxConnsPerUID: 1024, MaxConns: derived, IdleTimeout: 10 * time.Second, WarnInterval: 10 * time.Second}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}
	tooMany := DefaultLimits()
	tooMany.MaxConns = derived + 1
	if _, err := tooMany.workloadLimits(); err == nil || !strings.Contains(err.Error(), "max_connections") {
		t.Errorf("max_connections past RLIMIT_NOFILE: error = %v, want one naming max_connections", err)
	}
	if got, want := workloadapi.ConnsForFDs(1024), (1024-256)/2; got != want {
		t.Errorf("ConnsForFDs(1024) = %d, want %d", got, want)
	}
}

func TestHealthExhaustion(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	ok := snapshot{up: upstreamSnapshot{AgentID: spiffeid.RequireFromString("spiffe://example.org/lanyard/agent/tpm/ab"), AgentNotAfter: now.Add(time.Hour), SyncConnected: true}, tpm: tpmState{Reachable: true}}
	tests := []struct {
		name    string
		ex      []workloadapi.Exhaustion
		reasons []string
	}{
		{"uid at its cap now", []workloadapi.Exhaustion{{Limit: workloadapi.LimitConnsPerUID, UID: 65534, Cap: 1024, Now: true}},
			[]string{"uid 65534 at its connections_per_uid cap of 1024 (now)"}},
		{"uid refused a while ago", []workloadapi.Exhaustion{{Limit: workloadapi.LimitStreamsPerConn, UID: 1000, Cap: 128, Last: now.Add(-42 * time.Second)}},
			[]string{"uid 1000 at its streams_per_connection cap of 128 (42s ago)"}},
		{"accept failing", []workloadapi.Exhaustion{{Limit: workloadapi.LimitAccept, UID: -1, Last: now.Add(-3 * time.Second), Error: "accept unix /run/lanyard/workload.sock: accept4: too many open files"}},
			[]string{"Workload API accept failing (accept unix /run/lanyard/workload.sock: accept4: too many open files, 3s ago)"}},
		{"total cap", []workloadapi.Exhaustion{{Limit: workloadapi.LimitConns, UID: -1, Cap: 9872, Now: true}},
			[]string{"Workload API at its connections_total cap of 9872 (now)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := ok
			st.exhaustion = tt.ex
			got, reasons := health(st, now)
			if got != Degraded || !cmp.Equal(reasons, tt.reasons) {
				t.Errorf("health = %s %q, want %s %q", got, reasons, Degraded, tt.reasons)
			}
			r := Report{Health: got, Reasons: reasons, Signer: SignerReport{LastSync: &now}}
			if ready, why := readiness(r); !ready || why != "degraded: "+tt.reasons[0] {
				t.Errorf("readiness = %v %q, want ready with the reason", ready, why)
			}
		})
	}
}

func TestMetricsRefusals(t *testing.T) {
	m := testAgent().metrics
	m.Refused(workloadapi.LimitStreamsPerConn)
	m.Refused(workloadapi.LimitStreamsPerConn)
	m.Refused(workloadapi.LimitIdle)
	const want = `
# HELP lanyard_agent_workload_api_refusals_total Workload API connections and calls refused or closed by a limit, and failed accepts, by reason (README "Limits").
# TYPE lanyard_agent_workload_api_refusals_total counter
lanyard_agent_workload_api_refusals_total{reason="idle_connection"} 1
lanyard_agent_workload_api_refusals_total{reason="streams_per_connection"} 2
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "lanyard_agent_workload_api_refusals_total"); err != nil {
		t.Error(err)
	}
}

// parseConfigCase parses src as a.hcl: with errs, it checks ParseConfig
// fails with exactly those file:line errors and returns nil; otherwise it
// returns the config.
func parseConfigCase(t *testing.T, src string, errs []string) *Config {
	t.Helper()
	cfg, err := ParseConfig([]byte(src), "a.hcl")
	if errs != nil {
		var es hclconf.Errors
		if !errors.As(err, &es) {
			t.Fatalf("ParseConfig error = %v, want hclconf.Errors", err)
		}
		if diff := cmp.Diff(strings.Join(errs, "\n"), err.Error()); diff != "" {
			t.Errorf("errors (-want +got):\n%s", diff)
		}
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

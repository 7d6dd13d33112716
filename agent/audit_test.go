package agent

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testlog"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// jsonLog is a JSON hclog writing to a buffer the test reads back.
type jsonLog struct{ testlog.Buffer }

func (l *jsonLog) logger() hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: l, Level: hclog.Debug, JSONFormat: true})
}

// lines returns the decoded lines whose message is msg.
func (l *jsonLog) lines(t *testing.T, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for line := range strings.Lines(l.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line is not JSON: %q", line)
		}
		if m["@message"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// checkLine asserts that the one line with msg has want's values (a nil
// value only asks for the key to be present).
func (l *jsonLog) checkLine(t *testing.T, msg string, want map[string]any) {
	t.Helper()
	got := l.lines(t, msg)
	if len(got) != 1 {
		t.Fatalf("%d lines %q, want 1:\n%s", len(got), msg, l)
	}
	for k, v := range want {
		gv, ok := got[0][k]
		switch {
		case !ok:
			t.Errorf("line %q lacks %q: %v", msg, k, got[0])
		case v != nil && fmt.Sprint(gv) != fmt.Sprint(v):
			t.Errorf("line %q: %s = %v, want %v", msg, k, gv, v)
		}
	}
}

// checkNoSecrets fails if the log holds PEM key or CSR material.
func (l *jsonLog) checkNoSecrets(t *testing.T, secrets ...string) {
	t.Helper()
	logs := l.String()
	for _, bad := range append([]string{"PRIVATE KEY", "CERTIFICATE REQUEST"}, secrets...) {
		if strings.Contains(logs, bad) {
			t.Errorf("logs contain %.40q:\n%s", bad, logs)
		}
	}
}

func TestIssuedAuditLine(t *testing.T) {
	var logs jsonLog
	a := New(testAgent().cfg, logs.logger())
	now := time.Now()
	s := testSVID(t, "web", 1, now, now.Add(time.Hour))
	a.renew.recordIssued([]*svid{s})

	logs.checkLine(t, "x509-svid issued", map[string]any{
		"entry":     "web",
		"spiffe_id": "spiffe://example.org/web",
		"serial":    s.chain[0].SerialNumber.Text(16),
		"not_after": s.notAfter().UTC().Format(time.RFC3339),
	})
	logs.checkNoSecrets(t, string(s.keyPKCS8))
	if got := testutil.ToFloat64(a.metrics.svidsIssued.WithLabelValues("x509")); got != 1 {
		t.Errorf("svids_issued_total{kind=x509} = %v, want 1", got)
	}
}

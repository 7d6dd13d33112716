package agent

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/lanyard-dev/lanyard/attestor/workload"
)

func TestCacheExplain(t *testing.T) {
	t0 := time.Now()
	c := newCache("spiffe://example.org")
	c.setEntries([]*entry{
		testEntry("web", 1, "unix:uid:1000", "systemd:unit:web.service"),
		testEntry("any-1000", 1, "unix:uid:1000"),
		testEntry("db", 1, "unix:uid:999", "systemd:unit:db.service"),
		testEntry("held", 1, "unix:gid:1000"),
	})
	held := testSVID(t, "held", 1, t0, t0.Add(time.Hour))
	c.putSVIDs([]*svid{held})

	tests := []struct {
		name      string
		selectors []string
		matching  []ExplainedEntry
		missing   map[string][]string // not matching entry -> what it lacks
	}{
		{
			name:      "unit and uid match two entries in policy order",
			selectors: []string{"unix:uid:1000", "unix:gid:1000", "systemd:unit:web.service"},
			matching: []ExplainedEntry{
				{ID: "web", SPIFFEID: "spiffe://example.org/web", Selectors: []string{"unix:uid:1000", "systemd:unit:web.service"}},
				{ID: "any-1000", SPIFFEID: "spiffe://example.org/any-1000", Selectors: []string{"unix:uid:1000"}},
				{ID: "held", SPIFFEID: "spiffe://example.org/held", Selectors: []string{"unix:gid:1000"}, Serial: held.chain[0].SerialNumber.Text(16), NotAfter: timePtr(held.notAfter())},
			},
			missing: map[string][]string{"db": {"unix:uid:999", "systemd:unit:db.service"}},
		},
		{
			name:      "nothing matches and each entry says what it lacks",
			selectors: []string{"unix:uid:5", "systemd:unit:db.service"},
			missing: map[string][]string{
				"web":      {"unix:uid:1000", "systemd:unit:web.service"},
				"any-1000": {"unix:uid:1000"},
				"db":       {"unix:uid:999"},
				"held":     {"unix:gid:1000"},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ex := c.explain(tc.selectors)
			if diff := cmp.Diff(tc.matching, ex.Matching, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("matching (-want +got):\n%s", diff)
			}
			got := map[string][]string{}
			for _, e := range ex.NotMatching {
				got[e.ID] = e.Missing
			}
			if diff := cmp.Diff(tc.missing, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("missing (-want +got):\n%s", diff)
			}
			if len(ex.Selectors) != len(tc.selectors) {
				t.Errorf("selectors = %v, want the %d given", ex.Selectors, len(tc.selectors))
			}
		})
	}
}

// TestExplainProcess explains this test process through the admin
// handler, as `lanyard-agent explain` does, and refuses bad PIDs.
func TestExplainProcess(t *testing.T) {
	wl, err := workload.New(workload.Config{Attestors: []string{"unix"}})
	if err != nil {
		t.Fatal(err)
	}
	a := New(&Config{}, nil)
	a.workload = wl
	self := "unix:uid:" + itoa(os.Getuid())
	a.cache.setEntries([]*entry{testEntry("me", 1, self), testEntry("other", 1, "unix:uid:4242424")})

	ex, err := a.Explain(context.Background(), int32(os.Getpid()))
	if err != nil {
		t.Fatalf("Explain(self): %v", err)
	}
	if len(ex.Matching) != 1 || ex.Matching[0].ID != "me" || len(ex.NotMatching) != 1 || ex.NotMatching[0].Missing[0] != "unix:uid:4242424" {
		t.Errorf("Explain(self) = %+v", ex)
	}
	if int(ex.UID) != os.Getuid() || int(ex.PID) != os.Getpid() || !ex.Synced {
		t.Errorf("Explain(self) ids = pid %d uid %d synced %v", ex.PID, ex.UID, ex.Synced)
	}

	tests := []struct {
		name     string
		query    string
		wantCode int
	}{
		{"self", "pid=" + itoa(os.Getpid()), http.StatusOK},
		{"no pid", "", http.StatusBadRequest},
		{"not a number", "pid=web", http.StatusBadRequest},
		{"negative", "pid=-1", http.StatusBadRequest},
		{"too large", "pid=99999999999", http.StatusBadRequest},
		// PID_MAX_LIMIT is 2^22: no process can have this one.
		{"no such process", "pid=2000000000", http.StatusNotFound},
	}
	h := a.adminHandler()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/explain?"+tc.query, nil))
			if rec.Code != tc.wantCode {
				t.Errorf("GET /v1/explain?%s: %d %s, want %d", tc.query, rec.Code, rec.Body, tc.wantCode)
			}
		})
	}
	if _, err := a.Explain(context.Background(), 2000000000); !errors.Is(err, ErrNoSuchProcess) {
		t.Errorf("Explain(no such pid) = %v, want ErrNoSuchProcess", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

package telemetry

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
)

func TestEndpointsServe(t *testing.T) {
	reg := NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "lanyard_test_total", Help: "A test counter."})
	reg.MustRegister(c)
	c.Add(3)

	// Reserve a free port for the shared address, as an operator would
	// name one in the config.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	shared := l.Addr().String()
	l.Close()

	eps := Endpoints{}
	eps.Handle(shared, "/metrics", MetricsHandler(reg, hclog.NewNullLogger()))
	eps.Handle(shared, "/live", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	eps.Handle("", "/ready", http.NotFoundHandler()) // off: not added
	if len(eps) != 1 {
		t.Fatalf("%d listeners for one shared address, want 1", len(eps))
	}
	lns, err := eps.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, lns[shared], eps[shared], hclog.NewNullLogger()) }()

	tests := []struct {
		path     string
		wantCode int
		want     []string
	}{
		{"/metrics", http.StatusOK, []string{"lanyard_test_total 3", "go_goroutines ", "process_resident_memory_bytes "}},
		{"/live", http.StatusOK, []string{"ok"}},
		{"/ready", http.StatusNotFound, nil},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			resp, err := http.Get("http://" + shared + tt.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.wantCode {
				t.Errorf("GET %s = %s, want %d", tt.path, resp.Status, tt.wantCode)
			}
			for _, w := range tt.want {
				if !strings.Contains(string(body), w) {
					t.Errorf("GET %s lacks %q", tt.path, w)
				}
			}
		})
	}

	// A second Listen on the same address fails at once, not in a goroutine.
	if _, err := eps.Listen(); err == nil {
		t.Error("Listen on an address in use succeeded")
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return within 10s of cancel")
	}
	if _, err := http.Get("http://" + shared + "/live"); err == nil {
		t.Error("still serving after Serve returned")
	}
}

package signer

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// eventually polls cond until it holds, failing after 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPolicyReload(t *testing.T) {
	dir := t.TempDir()
	s := newTestSigner(t, dir, "")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	select {
	case <-s.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("signer not ready within 5s")
	}

	path := filepath.Join(dir, "policy.hcl")
	node := "node \"lab\" {\n  ek_sha256 = [\"" + strings.Repeat("ab", 32) + "\"]\n}\n"
	workload := func(name string) string {
		return "workload \"" + name + "\" {\n  spiffe_id = \"spiffe://example.org/" + name + "\"\n  nodes = [\"lab\"]\n  selectors = [\"unix:uid:1000\"]\n}\n"
	}
	changed := func() <-chan struct{} {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.changed
	}
	closed := func(c <-chan struct{}) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}

	steps := []struct {
		name          string
		edit          func(t *testing.T)
		wantWorkloads int
		wantOK        uint64
		wantFailed    uint64
		wantErr       string // in LastReloadError
	}{
		{"valid edit in place", func(t *testing.T) {
			writeTestFile(t, path, node+workload("web"))
		}, 1, 1, 0, ""},
		{"invalid edit keeps the last good policy", func(t *testing.T) {
			// Line 5 names a node block that does not exist.
			writeTestFile(t, path, node+strings.Replace(workload("db"), `["lab"]`, `["nope"]`, 1))
		}, 1, 1, 1, "policy.hcl:6: "},
		{"rename-replace edit", func(t *testing.T) {
			tmp := filepath.Join(dir, "policy.hcl.tmp")
			writeTestFile(t, tmp, node+workload("web")+workload("db"))
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		}, 2, 2, 1, ""},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := changed()
			st.edit(t)
			eventually(t, "the reload to be counted", func() bool {
				got := s.Stats()
				return got.PolicyReloads == st.wantOK && got.PolicyReloadFailures == st.wantFailed
			})
			got := s.Stats()
			m := s.Metrics().policyReloads
			if ok, failed := testutil.ToFloat64(m.WithLabelValues("ok")), testutil.ToFloat64(m.WithLabelValues("error")); ok != float64(st.wantOK) || failed != float64(st.wantFailed) {
				t.Errorf("policy_reloads_total ok=%v error=%v, want %d and %d", ok, failed, st.wantOK, st.wantFailed)
			}
			if got.Workloads != st.wantWorkloads {
				t.Errorf("workloads in force = %d, want %d", got.Workloads, st.wantWorkloads)
			}
			if !strings.Contains(got.LastReloadError, st.wantErr) || (st.wantErr == "") != (got.LastReloadError == "") {
				t.Errorf("LastReloadError = %q, want %q", got.LastReloadError, st.wantErr)
			}
			// Agents hear of a good edit at once, and of nothing else.
			if pushed := closed(before); pushed != (st.wantErr == "") {
				t.Errorf("sync streams woken = %v, want %v", pushed, st.wantErr == "")
			}
		})
	}
}

func writeTestFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReloadPolicyForced is `systemctl reload`: the file is read again even
// when unchanged, since a file it names may have changed.
func TestReloadPolicyForced(t *testing.T) {
	dir := t.TempDir()
	s := newTestSigner(t, dir, "")
	path := filepath.Join(dir, "policy.hcl")
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name       string
		prepare    func(t *testing.T)
		wantErr    bool
		wantOK     uint64
		wantFailed uint64
	}{
		{"unchanged file", func(*testing.T) {}, false, 1, 0},
		{"missing file", func(t *testing.T) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		}, true, 1, 1},
		{"invalid file", func(t *testing.T) { writeTestFile(t, path, "node {\n") }, true, 1, 2},
		{"restored", func(t *testing.T) { writeTestFile(t, path, string(src)) }, false, 2, 2},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.prepare(t)
			err := s.ReloadPolicy()
			if (err != nil) != st.wantErr {
				t.Errorf("ReloadPolicy: %v, want error %v", err, st.wantErr)
			}
			got := s.Stats()
			if got.PolicyReloads != st.wantOK || got.PolicyReloadFailures != st.wantFailed {
				t.Errorf("reloads %d ok %d failed, want %d %d", got.PolicyReloads, got.PolicyReloadFailures, st.wantOK, st.wantFailed)
			}
			if got.Nodes != 1 {
				t.Errorf("nodes in force = %d, want the last good policy's 1", got.Nodes)
			}
		})
	}
}

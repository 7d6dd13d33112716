package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/lanyard-dev/lanyard/attestor/workload"
)

// Explanation is the answer to `lanyard-agent explain PID`: what the agent
// sees of a process and why each of its node's entries does or does not
// apply to it. Its JSON field names are stable and documented in the README.
type Explanation struct {
	PID uint32 `json:"pid"`
	// UID and GID are the process's effective ids now. A Workload API
	// call is judged by the ids it had when it connected, which are the
	// same unless the process changed them since.
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	// Selectors are what the configured workload attestors found, sorted:
	// the same a Workload API call from this process gets.
	Selectors []string `json:"selectors"`
	// Synced is false while the agent has not yet received its entries
	// from the signer: then nothing matches yet.
	Synced bool `json:"synced"`
	// Matching are the entries whose every selector the process has, in
	// the order a Workload API response lists their SVIDs.
	Matching []ExplainedEntry `json:"matching"`
	// NotMatching are the node's other entries, each with the selectors
	// the process lacks.
	NotMatching []ExplainedEntry `json:"not_matching"`
}

// ExplainedEntry is one entry of the node, seen from one process.
type ExplainedEntry struct {
	ID        string   `json:"id"`
	SPIFFEID  string   `json:"spiffe_id"`
	Hint      string   `json:"hint,omitempty"`
	Selectors []string `json:"selectors"`
	// Missing lists the entry's selectors the process lacks (not matching
	// entries only).
	Missing []string `json:"missing,omitempty"`
	// Serial and NotAfter describe the SVID the agent holds for a matching
	// entry; absent when it holds none yet, and then the process would get
	// nothing for this entry until the agent has one.
	Serial   string     `json:"serial,omitempty"`
	NotAfter *time.Time `json:"not_after,omitempty"`
}

// ErrNoSuchProcess is returned by Explain for a PID that names no process.
var ErrNoSuchProcess = errors.New("no such process")

// Explain attests the process pid as the Workload API would and says
// which entries it matches and what the others lack.
func (a *Agent) Explain(ctx context.Context, pid int32) (*Explanation, error) {
	if a.workload == nil {
		return nil, errors.New("the agent is still starting")
	}
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d: %w", pid, ErrNoSuchProcess)
	}
	proc, err := workload.PinPID(pid)
	if errors.Is(err, workload.ErrCallerExited) {
		return nil, fmt.Errorf("pid %d: %w", pid, ErrNoSuchProcess)
	}
	if err != nil {
		return nil, err
	}
	defer proc.PIDFD.Close()
	selectors, err := a.workload.Attest(ctx, proc)
	if errors.Is(err, workload.ErrCallerExited) {
		return nil, fmt.Errorf("pid %d exited while being attested: %w", pid, ErrNoSuchProcess)
	}
	if err != nil {
		return nil, fmt.Errorf("attest pid %d: %w", pid, err)
	}
	ex := a.cache.explain(selectors)
	ex.PID, ex.UID, ex.GID = uint32(pid), proc.UID, proc.GID
	return ex, nil
}

// serveExplain answers GET /v1/explain?pid=N.
func (a *Agent) serveExplain(w http.ResponseWriter, r *http.Request) {
	raw := r.URL.Query().Get("pid")
	pid, err := strconv.ParseInt(raw, 10, 32)
	if err != nil || pid <= 0 {
		http.Error(w, fmt.Sprintf("pid %q: want a positive process ID", raw), http.StatusBadRequest)
		return
	}
	ex, err := a.Explain(r.Context(), int32(pid))
	switch {
	case errors.Is(err, ErrNoSuchProcess):
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	case err != nil:
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	writeJSON(w, ex)
}

package signer

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/lanyard-dev/lanyard/internal/adminsock"
	"github.com/lanyard-dev/lanyard/internal/cli"
)

// StatusReport is the signer's health, as `lanyard-signer status` shows it.
type StatusReport struct {
	Version         string     `json:"version"`
	Address         string     `json:"address"`
	TrustDomain     string     `json:"trust_domain"`
	BundleSequence  uint64     `json:"bundle_sequence"`
	CAs             []CAStatus `json:"cas"`
	AgentsKnown     int        `json:"agents_known"`
	AgentsAttested  int        `json:"agents_attested"` // holding a valid attestation now
	AgentsConnected int        `json:"agents_connected"`
	Revoked         int        `json:"revoked"`
	UptimeSeconds   int64      `json:"uptime_seconds"`
	// BundleEndpoint is the bundle_endpoint listener; absent without one.
	BundleEndpoint *BundleEndpointStatus `json:"bundle_endpoint,omitempty"`
	// Federation is one line per federation block, in file order.
	Federation []FederationStatus `json:"federation,omitempty"`
	// Warnings are problems that change nothing yet, such as a policy
	// federates_with naming a trust domain without a federation block.
	Warnings []string `json:"warnings,omitempty"`
	// The replica's view of its tier (replica, etcd, policy_revision,
	// ...); absent for a lone signer.
	*TierStatus
}

// BundleEndpointStatus is the bundle endpoint, as federated peers must be
// configured to reach it.
type BundleEndpointStatus struct {
	ListenAddress      string `json:"listen_address"`
	Profile            string `json:"profile"`
	EndpointSPIFFEID   string `json:"endpoint_spiffe_id,omitempty"` // https_spiffe only
	RefreshHintSeconds int64  `json:"refresh_hint_seconds"`
}

// CAStatus is one CA of the trust bundle.
type CAStatus struct {
	Subject   string    `json:"subject"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
}

// Status is the signer's health report at now.
func (s *Signer) Status(now time.Time) StatusReport {
	s.mu.Lock()
	r := StatusReport{
		Version: cli.Version(), Address: s.addr, TrustDomain: s.cfg.TrustDomain.String(), BundleSequence: s.bundleN,
		AgentsKnown: len(s.nodes), UptimeSeconds: int64(now.Sub(s.started).Seconds()),
	}
	for _, c := range s.auth.published() {
		r.CAs = append(r.CAs, CAStatus{Subject: c.Subject.String(), NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC()})
	}
	for _, a := range s.agents {
		if now.Before(a.notAfter) {
			r.AgentsAttested++
		}
	}
	for _, n := range s.nodes {
		if n.Revoked != nil {
			r.Revoked++
		}
	}
	r.Warnings = s.fedWarnings
	s.mu.Unlock()
	if b := s.cfg.BundleEndpoint; b != nil {
		r.BundleEndpoint = &BundleEndpointStatus{ListenAddress: b.ListenAddress, Profile: b.Profile(), RefreshHintSeconds: int64(s.bundleHint / time.Second)}
		if b.Profile() == ProfileHTTPSSPIFFE {
			r.BundleEndpoint.EndpointSPIFFEID = s.id.String()
		}
	}
	r.Federation = s.federationStatus()
	r.AgentsConnected = s.syncs.connected()
	r.TierStatus = s.tierStatus()
	return r
}

// listenAdmin opens admin_socket_path; nil when it is not set.
func (s *Signer) listenAdmin() (net.Listener, error) {
	if s.cfg.AdminSocketPath == "" {
		return nil, nil
	}
	return adminsock.Listen(s.cfg.AdminSocketPath, s.log.Named("admin"))
}

// serveAdmin answers `lanyard-signer status` and `node ...` on ln until
// ctx ends.
func (s *Signer) serveAdmin(ctx context.Context, ln net.Listener) error {
	return adminsock.Serve(ctx, ln, s.cfg.AdminSocketPath, s.AdminHandler(), nil)
}

// NodeRequest is the body of the admin socket's revoke and unrevoke calls.
type NodeRequest struct {
	Node   string `json:"node"`
	Reason string `json:"reason,omitempty"`
}

// AdminError is the body of a refused admin call.
type AdminError struct {
	Error string `json:"error"`
}

// AdminHandler serves the admin endpoints (on the root-only socket).
func (s *Signer) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, s.Status(time.Now()))
	})
	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, s.Nodes())
	})
	mux.HandleFunc("POST /v1/nodes/revoke", adminCall(64<<10, func(r *http.Request, req NodeRequest, uid uint32) (NodeInfo, error) {
		return s.Revoke(req.Node, req.Reason, uid)
	}))
	mux.HandleFunc("POST /v1/nodes/unrevoke", adminCall(64<<10, func(r *http.Request, req NodeRequest, uid uint32) (NodeInfo, error) {
		return s.Unrevoke(req.Node, uid)
	}))
	mux.HandleFunc("GET /v1/tokens", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, s.TokenRevocations())
	})
	mux.HandleFunc("POST /v1/tokens/revoke", adminCall(64<<10, func(r *http.Request, req TokenRevokeRequest, uid uint32) (TokenRevocation, error) {
		return s.RevokeToken(req, uid)
	}))
	mux.HandleFunc("GET /v1/policy", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, s.PolicyStatus())
	})
	mux.HandleFunc("POST /v1/policy/apply", adminCall(4*maxPolicyBytes, func(r *http.Request, req PolicyApply, uid uint32) (PolicyStatus, error) {
		return s.ApplyPolicy(r.Context(), req, uid)
	}))
	mux.HandleFunc("GET /v1/replicas", func(w http.ResponseWriter, _ *http.Request) {
		rs, err := s.Replicas()
		if err != nil {
			writeJSON(w, adminCode(err), AdminError{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, rs)
	})
	type forgetRequest struct {
		Name string `json:"name"`
	}
	mux.HandleFunc("POST /v1/replicas/forget", adminCall(64<<10, func(r *http.Request, req forgetRequest, _ uint32) (map[string]string, error) {
		if err := s.ForgetReplica(r.Context(), req.Name); err != nil {
			return nil, err
		}
		return map[string]string{"forgotten": req.Name}, nil
	}))
	return mux
}

// adminCall serves a POST whose JSON body (at most limit bytes, no unknown
// fields) is a Req: f acts on it for the calling uid, and its answer or
// refusal goes back as JSON (a refusal with adminCode's status).
func adminCall[Req, Resp any](limit int64, f func(r *http.Request, req Req, uid uint32) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		dec := json.NewDecoder(io.LimitReader(r.Body, limit))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, AdminError{"bad request: " + err.Error()})
			return
		}
		cred, _ := adminsock.Peer(r)
		resp, err := f(r, req, cred.UID)
		if err != nil {
			writeJSON(w, adminCode(err), AdminError{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, resp)
	}
}

// adminCode is the HTTP status of a refused admin call.
func adminCode(err error) int {
	if code, ok := tierAdminCode(err); ok {
		return code
	}
	switch {
	case errors.Is(err, ErrUnknownNode):
		return http.StatusNotFound
	case errors.Is(err, ErrAlreadyRevoked), errors.Is(err, ErrNotRevoked), errors.Is(err, ErrTokenAlreadyRevoked):
		return http.StatusConflict
	case errors.Is(err, ErrBadReason), errors.Is(err, ErrBadNodeName), errors.Is(err, ErrBadTokenRevocation):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

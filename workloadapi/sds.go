package workloadapi

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	attestor "github.com/lanyard-dev/lanyard/attestor/workload"
)

// Envoy fetches certificates with the Secret Discovery Service (SDS v3),
// and SPIRE serves it on its Workload API socket; so does Lanyard, with
// SPIRE's resource names, so that an Envoy bootstrap written for SPIRE
// works unchanged. It is the same caller on the same socket: the same
// attestation, pinned-process binding, limits, audit lines and metrics as
// FetchX509SVID. Only the security header is not required (Envoy does not
// send it; see headerExempt).

// Bounds on one SDS request: Envoy asks for one to a few secrets per
// stream; an SVID's name is a SPIFFE ID (at most 2,048 bytes).
const (
	maxSDSNames    = 64
	maxSDSNameSize = 2048
	// maxNACKDetail bounds the part of Envoy's error detail that is logged.
	maxNACKDetail = 1024
)

// sdsHandler serves envoy.service.secret.v3.SecretDiscoveryService. It
// picks every gRPC status code SDS returns.
type sdsHandler struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer // DeltaSecrets
	h                                                  *handler
	cfg                                                SDSConfig // defaulted
}

// sdsRequest is a checked request: its names (empty ones and repeats
// dropped, order kept) and the Envoy node that sent it.
type sdsRequest struct {
	names []string
	node  *corev3.Node
}

// checkSDSRequest refuses a request that is not for secrets or names more
// than any Envoy would.
func checkSDSRequest(req *discoveryv3.DiscoveryRequest) (sdsRequest, error) {
	if t := req.GetTypeUrl(); t != "" && t != secretTypeURL {
		return sdsRequest{}, status.Errorf(codes.InvalidArgument, "type_url %.200q is not %s", t, secretTypeURL)
	}
	raw := req.GetResourceNames()
	if len(raw) > maxSDSNames {
		return sdsRequest{}, status.Errorf(codes.InvalidArgument, "too many resource names: %d (limit %d)", len(raw), maxSDSNames)
	}
	out := sdsRequest{names: make([]string, 0, len(raw)), node: req.GetNode()}
	for i, n := range raw {
		if len(n) > maxSDSNameSize {
			return sdsRequest{}, status.Errorf(codes.InvalidArgument, "resource name %d: %d bytes (limit %d)", i, len(n), maxSDSNameSize)
		}
		if n != "" && !slices.Contains(out.names, n) {
			out.names = append(out.names, n)
		}
	}
	return out, nil
}

// sameNames reports whether a and b name the same resources.
func sameNames(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for _, n := range a {
		if !slices.Contains(b, n) {
			return false
		}
	}
	return true
}

// current resolves names against what the caller may have now, and
// returns the channels closed when that may change.
func (s *sdsHandler) current(selectors, names []string, node *corev3.Node) (sdsSet, <-chan struct{}, <-chan struct{}) {
	svids, svidsChanged := s.h.source.X509SVIDResponse(selectors)
	// The own bundle, and those of the trust domains the caller's entries
	// federate with (ALL, a trust domain's name, the wildcard).
	bundles, bundlesChanged := s.h.source.X509BundlesFor(selectors)
	set := s.cfg.resolve(names, svids.GetSvids(), bundles.GetBundles(), s.cfg.spiffeValidator(node))
	return set, svidsChanged, bundlesChanged
}

// response builds the DiscoveryResponse for set, with a fresh nonce.
func (s *sdsHandler) response(set sdsSet) (*discoveryv3.DiscoveryResponse, error) {
	resp := &discoveryv3.DiscoveryResponse{VersionInfo: set.version, TypeUrl: secretTypeURL, Nonce: rand.Text()}
	resp.Resources = make([]*anypb.Any, 0, len(set.resources))
	for _, r := range set.resources {
		a, err := r.secret()
		if err != nil {
			s.h.log.Error("cannot build SDS secret", "error", err)
			return nil, status.Error(codes.Internal, "cannot build secret")
		}
		resp.Resources = append(resp.Resources, a)
	}
	return resp, nil
}

// FetchSecrets answers one request with the secrets the caller may have
// now (unknown names left out, as in StreamSecrets).
func (s *sdsHandler) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	r, err := checkSDSRequest(req)
	if err != nil {
		return nil, err
	}
	proc, selectors, err := s.h.attest(ctx)
	if err != nil {
		return nil, err
	}
	log := s.h.log.With("pid", proc.PID, "uid", proc.UID, "exe", exePath(selectors))
	set, _, _ := s.current(selectors, r.names, r.node)
	resp, err := s.response(set)
	if err != nil {
		return nil, err
	}
	s.audit(log, "served SDS secrets", selectors, set, r.names)
	return resp, nil
}

// StreamSecrets serves one Envoy's SDS stream, state of the world: every
// response holds every resource the last request named, with version_info
// (a digest of that content) and a fresh nonce. It answers at once a
// request that names other resources, then pushes again whenever what
// they resolve to changes (a rotation, a bundle change); an ACK or a NACK
// of the last response waits for the next change, so a rejected secret is
// never sent in a loop. A request whose nonce is not the last one sent is
// stale, and ignored (the xDS protocol).
func (s *sdsHandler) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	ctx := stream.Context()
	proc, selectors, err := s.h.attest(ctx)
	if err != nil {
		return err
	}
	log := s.h.log.With("pid", proc.PID, "uid", proc.UID, "exe", exePath(selectors))
	exited := callerExit(ctx)

	reqs := make(chan *discoveryv3.DiscoveryRequest)
	recvErr := make(chan error, 1)
	go func() {
		// Ends with the call: Recv fails once the handler has returned.
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()

	st := sdsStream{s: s, log: log, proc: proc, selectors: selectors}
	for {
		var svidsChanged, bundlesChanged <-chan struct{}
		if st.subscribed {
			var set sdsSet
			set, svidsChanged, bundlesChanged = s.current(selectors, st.names, st.node)
			if set.version != st.version {
				if err := st.push(stream, set); err != nil {
					return err
				}
			}
		}
		select {
		case <-exited:
			return st.callerExited(ctx)
		default:
		}
		select {
		case <-exited:
			return st.callerExited(ctx)
		case <-svidsChanged:
		case <-bundlesChanged:
		case req := <-reqs:
			if err := st.request(req); err != nil {
				return err
			}
			continue
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil // Envoy closed its side: done
			}
			return err
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-s.h.stopping:
			return errShuttingDown
		}
		// A client that does not read holds the next push until the last
		// one has left, so rotations coalesce (sendtrack.go).
		if err := waitSent(ctx, s.h.stopping); err != nil {
			return err
		}
	}
}

// sdsStream is the state of one StreamSecrets call.
type sdsStream struct {
	s         *sdsHandler
	log       hclog.Logger
	proc      attestor.Process
	selectors []string

	subscribed bool
	names      []string     // the last request's, checked
	node       *corev3.Node // the last node Envoy sent (it may send it once)
	version    string       // of the last response sent
	nonce      string       // of the last response sent
	served     []string     // names in the last response sent
	sent       bool         // a response was sent
}

// request takes one DiscoveryRequest: a subscription (the first, or one
// naming other resources), an ACK, a NACK or a stale request.
func (st *sdsStream) request(raw *discoveryv3.DiscoveryRequest) error {
	req, err := checkSDSRequest(raw)
	if err != nil {
		st.log.Info("refused SDS request", "error", err)
		return err
	}
	if st.nonce != "" && raw.GetResponseNonce() != st.nonce {
		st.log.Debug("ignored stale SDS request", "nonce", raw.GetResponseNonce(), "expected", st.nonce)
		return nil
	}
	if req.node != nil {
		st.node = req.node
	}
	if d := raw.GetErrorDetail(); d != nil {
		// Envoy could not apply what it was sent: say why, once per uid
		// and interval, and wait for the next real change rather than
		// send the same thing again.
		msg := d.GetMessage()
		if len(msg) > maxNACKDetail {
			msg = msg[:maxNACKDetail] + "…"
		}
		st.s.h.warn.Warn(st.proc.UID, "envoy rejected SDS secrets", "pid", st.proc.PID, "uid", st.proc.UID,
			"resource_names", req.names, "rejected_version", st.version, "envoy_version", raw.GetVersionInfo(),
			"error_code", d.GetCode(), "error_detail", msg)
	}
	if st.subscribed && sameNames(st.names, req.names) {
		return nil // an ACK or a NACK: the next push waits for a change
	}
	st.subscribed, st.names = true, req.names
	// Answer at once, even if the content digest were the same.
	st.version = ""
	return nil
}

// push sends set, after confirming the caller is still the process that
// was attested (nothing goes to one that exec'd, changed uid or exited).
func (st *sdsStream) push(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse], set sdsSet) error {
	if err := st.proc.Recheck(); err != nil {
		return st.end(changeReason(err), err)
	}
	resp, err := st.s.response(set)
	if err != nil {
		return err
	}
	nonce := resp.GetNonce()
	if err := stream.Send(resp); err != nil {
		return err
	}
	names, _, _, _ := set.audit()
	// Info when what is served changes by name, Debug for each rotation
	// push, like the X.509 stream.
	if !st.sent || !slices.Equal(st.served, names) {
		st.s.audit(st.log, "served SDS secrets", st.selectors, set, st.names)
	} else if st.log.IsDebug() {
		st.s.audit(st.log, "pushed rotated SDS secrets", nil, set, st.names)
	}
	st.sent, st.version, st.nonce, st.served = true, set.version, nonce, names
	return nil
}

// audit writes one audit line (README "Audit log") about set.
func (s *sdsHandler) audit(log hclog.Logger, msg string, selectors []string, set sdsSet, requested []string) {
	names, ids, serials, tds := set.audit()
	kv := []any{"resource_names", names, "spiffe_ids", ids, "serials", serials, "trust_domains", tds, "version", set.version}
	if selectors != nil {
		kv = append(kv, "selectors", selectors)
	}
	if len(set.unknown) > 0 {
		kv = append(kv, "unknown_resource_names", set.unknown)
	}
	if len(requested) == 0 {
		kv = append(kv, "wildcard", true)
	}
	log.Info(msg, kv...)
}

// callerExited ends the stream of a caller that exited. A process that
// exits closes its socket first, so the ordinary end of an Envoy comes as
// a cancelled call within exitGrace and logs nothing; only a connection
// still held by another process earns the audit line.
func (st *sdsStream) callerExited(ctx context.Context) error {
	t := time.NewTimer(exitGrace)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-t.C:
		return st.end("the caller exited", attestor.ErrCallerExited)
	}
}

// end logs why the stream ends because of its caller and returns the
// Unavailable it ends with (Envoy reconnects and is attested afresh).
func (st *sdsStream) end(reason string, err error) error {
	if reason == "" {
		reason = "the caller could not be re-checked"
	}
	st.log.Info("ended SDS stream", "reason", reason, "error", err)
	return status.Error(codes.Unavailable, reason)
}

// isSDSMethod says whether fullMethod belongs to the SDS service.
func isSDSMethod(fullMethod string) bool {
	return strings.HasPrefix(fullMethod, "/"+secretv3.SecretDiscoveryService_ServiceDesc.ServiceName+"/")
}

package workloadapi

import (
	"context"
	"encoding/asn1"
	"math/big"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/selector"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Observer is told what the server does, for metrics and status. The
// server calls it on every call's path, so its methods must be cheap and
// must not block. Method names are the short gRPC names, e.g.
// "FetchX509SVID"; the set is fixed by the Workload API, so they are safe
// as metric labels.
type Observer interface {
	// CallDone reports a finished call (a stream when it ends) and the
	// code it ended with: OK, or why it was refused.
	CallDone(method string, code codes.Code)
	// StreamOpened and StreamClosed bracket each streaming call, refused
	// ones included.
	StreamOpened(method string)
	StreamClosed(method string)
	// CallerAttested reports how long a caller's attestation took and
	// whether it succeeded.
	CallerAttested(d time.Duration, ok bool)
}

// nopObserver stands in when Config.Observer is nil.
type nopObserver struct{}

func (nopObserver) CallDone(string, codes.Code)        {}
func (nopObserver) StreamOpened(string)                {}
func (nopObserver) StreamClosed(string)                {}
func (nopObserver) CallerAttested(time.Duration, bool) {}

// shortMethod turns "/SpiffeWorkloadAPI/FetchX509SVID" into "FetchX509SVID".
func shortMethod(full string) string {
	return full[strings.LastIndexByte(full, '/')+1:]
}

// observeUnary reports each unary call; it runs outside the header check
// so that refused calls are counted too.
func observeUnary(o Observer) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		resp, err := next(ctx, req)
		o.CallDone(shortMethod(info.FullMethod), status.Code(err))
		return resp, err
	}
}

// observeStream reports each streaming call as it opens and ends.
func observeStream(o Observer) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		m := shortMethod(info.FullMethod)
		o.StreamOpened(m)
		err := next(srv, ss)
		o.StreamClosed(m)
		o.CallDone(m, status.Code(err))
		return err
	}
}

// auditFacts are what an audit line says about the SVIDs in a response:
// their SPIFFE IDs and serials (hex), never their keys.
func auditFacts(resp *workload.X509SVIDResponse) (ids, serials []string) {
	ids = make([]string, 0, len(resp.GetSvids()))
	serials = make([]string, 0, len(resp.GetSvids()))
	for _, s := range resp.GetSvids() {
		ids = append(ids, s.GetSpiffeId())
		serials = append(serials, leafSerial(s.GetX509Svid()))
	}
	return ids, serials
}

// leafSerial returns the serial number (hex) of the first certificate in a
// DER chain, or "?". It reads only the serial's field: a full parse costs
// ~30µs per SVID, a tenth of a one-shot fetch, for one log field.
func leafSerial(chain []byte) string {
	var cert, tbs, field asn1.RawValue
	if _, err := asn1.Unmarshal(chain, &cert); err != nil || cert.Tag != asn1.TagSequence {
		return "?"
	}
	if _, err := asn1.Unmarshal(cert.Bytes, &tbs); err != nil || tbs.Tag != asn1.TagSequence {
		return "?"
	}
	rest, err := asn1.Unmarshal(tbs.Bytes, &field)
	if err == nil && field.Class == asn1.ClassContextSpecific && field.Tag == 0 {
		_, err = asn1.Unmarshal(rest, &field) // skip the version
	}
	if err != nil || field.Class != asn1.ClassUniversal || field.Tag != asn1.TagInteger || len(field.Bytes) == 0 || field.Bytes[0]&0x80 != 0 {
		return "?"
	}
	return new(big.Int).SetBytes(field.Bytes).Text(16)
}

// exePath returns the executable path among a caller's selectors (the
// unix attestor's unix:path), so the audit line names the binary that
// this very attestation saw, not what /proc says a moment later; "" when
// the unix attestor is off.
func exePath(selectors []string) string {
	for _, s := range selectors {
		if p, ok := strings.CutPrefix(s, selector.UnixPath); ok {
			return p
		}
	}
	return ""
}

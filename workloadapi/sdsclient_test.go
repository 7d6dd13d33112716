package workloadapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// envoy is a test SDS client that behaves as Envoy does on a
// StreamSecrets stream: a first request with its node and the names it
// wants, an ACK (the version and nonce just received) or a NACK (the last
// version it accepted, the nonce, and an error detail) after each
// response, and a request with the last nonce when it wants other names.
// It sends no workload.spiffe.io header: Envoy does not.
type envoy struct {
	t        *testing.T
	stream   grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	resps    chan *discoveryv3.DiscoveryResponse
	ended    chan error
	node     *corev3.Node
	names    []string
	accepted string // the last version ACKed
	last     *discoveryv3.DiscoveryResponse
}

// sdsConn dials the socket at path with no security header.
func sdsConn(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func newEnvoy(t *testing.T, cc *grpc.ClientConn, node *corev3.Node) *envoy {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := secretv3.NewSecretDiscoveryServiceClient(cc).StreamSecrets(ctx)
	if err != nil {
		t.Fatalf("StreamSecrets: %v", err)
	}
	e := &envoy{t: t, stream: stream, resps: make(chan *discoveryv3.DiscoveryResponse, 16), ended: make(chan error, 1), node: node}
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				e.ended <- err
				return
			}
			e.resps <- r
		}
	}()
	return e
}

func (e *envoy) send(req *discoveryv3.DiscoveryRequest) {
	e.t.Helper()
	req.TypeUrl = secretTypeURL
	// io.EOF means the server ended the stream (a refusal, say): its
	// status comes from Recv, which reports it on e.ended.
	if err := e.stream.Send(req); err != nil && !errors.Is(err, io.EOF) {
		e.t.Fatalf("send: %v", err)
	}
}

// subscribe asks for names (the first request carries the node).
func (e *envoy) subscribe(names ...string) {
	e.t.Helper()
	e.names = names
	req := &discoveryv3.DiscoveryRequest{ResourceNames: names, VersionInfo: e.accepted}
	if e.last == nil {
		req.Node = e.node
	} else {
		req.ResponseNonce = e.last.GetNonce()
	}
	e.send(req)
}

func (e *envoy) ack() {
	e.t.Helper()
	e.accepted = e.last.GetVersionInfo()
	e.send(&discoveryv3.DiscoveryRequest{ResourceNames: e.names, VersionInfo: e.accepted, ResponseNonce: e.last.GetNonce()})
}

func (e *envoy) nack(detail string) {
	e.t.Helper()
	e.send(&discoveryv3.DiscoveryRequest{ResourceNames: e.names, VersionInfo: e.accepted, ResponseNonce: e.last.GetNonce(),
		ErrorDetail: &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: detail}})
}

// next returns the next response, checking what every response must
// carry; it fails after 10s.
func (e *envoy) next() *discoveryv3.DiscoveryResponse {
	e.t.Helper()
	select {
	case r := <-e.resps:
		if r.GetVersionInfo() == "" || r.GetNonce() == "" || r.GetTypeUrl() != secretTypeURL {
			e.t.Fatalf("response version %q, nonce %q, type %q: want all set", r.GetVersionInfo(), r.GetNonce(), r.GetTypeUrl())
		}
		if e.last != nil && r.GetNonce() == e.last.GetNonce() {
			e.t.Fatalf("nonce %q reused", r.GetNonce())
		}
		e.last = r
		return r
	case err := <-e.ended:
		e.t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		e.t.Fatal("no SDS response after 10s")
	}
	return nil
}

// decodeSecrets unpacks a response's secrets by name, in order.
func decodeSecrets(t *testing.T, r *discoveryv3.DiscoveryResponse) ([]string, map[string]*tlsv3.Secret) {
	t.Helper()
	var names []string
	out := map[string]*tlsv3.Secret{}
	for _, a := range r.GetResources() {
		s := &tlsv3.Secret{}
		if err := a.UnmarshalTo(s); err != nil {
			t.Fatalf("resource of type %s: %v", a.GetTypeUrl(), err)
		}
		names = append(names, s.GetName())
		out[s.GetName()] = s
	}
	return names, out
}

// keyPair turns a tls_certificate secret into what crypto/tls serves.
func keyPair(t *testing.T, s *tlsv3.Secret) tls.Certificate {
	t.Helper()
	tc := s.GetTlsCertificate()
	if tc == nil {
		t.Fatalf("secret %q is not a tls_certificate", s.GetName())
	}
	c, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		t.Fatalf("secret %q: %v", s.GetName(), err)
	}
	if c.Leaf == nil {
		t.Fatalf("secret %q: no leaf", s.GetName())
	}
	return c
}

// leafID is the SPIFFE ID a tls_certificate secret proves, and its serial.
func leafID(t *testing.T, s *tlsv3.Secret) (string, string) {
	t.Helper()
	c := keyPair(t, s)
	return c.Leaf.URIs[0].String(), c.Leaf.SerialNumber.Text(16)
}

// pemCerts parses PEM certificates.
func pemCerts(t *testing.T, b []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

// trustedCA returns the CAs of a validation_context secret with
// trusted_ca.
func trustedCA(t *testing.T, s *tlsv3.Secret) []*x509.Certificate {
	t.Helper()
	vc := s.GetValidationContext()
	if vc == nil || vc.GetCustomValidatorConfig() != nil {
		t.Fatalf("secret %q is not a trusted_ca validation_context: %v", s.GetName(), s)
	}
	return pemCerts(t, vc.GetTrustedCa().GetInlineBytes())
}

// spiffeValidatorTDs returns, per trust domain, the CAs of a
// validation_context secret with the SPIFFE certificate validator.
func spiffeValidatorTDs(t *testing.T, s *tlsv3.Secret) ([]string, map[string][]*x509.Certificate) {
	t.Helper()
	cv := s.GetValidationContext().GetCustomValidatorConfig()
	if cv.GetName() != "envoy.tls.cert_validator.spiffe" {
		t.Fatalf("secret %q: custom validator %q, want envoy.tls.cert_validator.spiffe", s.GetName(), cv.GetName())
	}
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	if err := cv.GetTypedConfig().UnmarshalTo(cfg); err != nil {
		t.Fatal(err)
	}
	var names []string
	out := map[string][]*x509.Certificate{}
	for _, td := range cfg.GetTrustDomains() {
		names = append(names, td.GetName())
		out[td.GetName()] = pemCerts(t, td.GetTrustBundle().GetInlineBytes())
	}
	return names, out
}

// readSDSStream is readStream for SDS (the helper's reader-sds mode): it
// subscribes to default, prints "svid <path>" per response and ACKs it,
// then "end <code>: <message>".
func readSDSStream(cc *grpc.ClientConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(cc).StreamSecrets(ctx)
	if err == nil {
		err = stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretTypeURL, ResourceNames: []string{"default"}})
	}
	if errors.Is(err, io.EOF) {
		// The server ended the stream first: Recv has its status.
		_, err = stream.Recv()
	}
	for err == nil {
		var resp *discoveryv3.DiscoveryResponse
		if resp, err = stream.Recv(); err != nil {
			break
		}
		var ids []string
		for _, a := range resp.GetResources() {
			s := &tlsv3.Secret{}
			if err = a.UnmarshalTo(s); err != nil {
				break
			}
			blk, _ := pem.Decode(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			if blk == nil {
				err = errors.New("no certificate")
				break
			}
			c, perr := x509.ParseCertificate(blk.Bytes)
			if perr != nil || len(c.URIs) == 0 {
				err = fmt.Errorf("leaf: %v", perr)
				break
			}
			ids = append(ids, strings.TrimPrefix(c.URIs[0].String(), "spiffe://example.org"))
		}
		fmt.Println("svid", strings.Join(ids, ","))
		if err == nil {
			err = stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretTypeURL, ResourceNames: []string{"default"},
				VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
			if errors.Is(err, io.EOF) {
				err = nil // the next Recv has the status
			}
		}
	}
	st := status.Convert(err)
	fmt.Printf("end %s: %s\n", st.Code(), st.Message())
}

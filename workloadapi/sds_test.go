package workloadapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
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
	if err := e.stream.Send(req); err != nil {
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

// TestSDSStreamSecrets follows one Envoy through a stream's life:
// subscription, ACK, rotation push, NACK without a resend, a stale
// request, new names mid-stream, and an unknown name that leaves the
// stream up.
func TestSDSStreamSecrets(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	first := ca.svidResponse(t, "/web")
	src.set(uidSelector(), first)
	srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src,
		SDS: SDSConfig{TrustDomain: td}})
	e := newEnvoy(t, sdsConn(t, srv.path), &corev3.Node{Id: "envoy-1"})

	// served checks a response's names and the default SVID's serial.
	served := func(r *discoveryv3.DiscoveryResponse, want []string, serialOf *workload.X509SVIDResponse) {
		t.Helper()
		names, secrets := decodeSecrets(t, r)
		if !slices.Equal(names, want) {
			t.Fatalf("served %q, want %q", names, want)
		}
		if serialOf == nil {
			return
		}
		id, serial := leafID(t, secrets["default"])
		if wantSerial := leafSerial(serialOf.Svids[0].X509Svid); id != "spiffe://example.org/web" || serial != wantSerial {
			t.Fatalf("default is %s serial %s, want spiffe://example.org/web serial %s", id, serial, wantSerial)
		}
	}

	t.Run("subscribe", func(t *testing.T) {
		e.subscribe("default", "ROOTCA")
		r := e.next()
		served(r, []string{"default", "ROOTCA"}, first)
		srv.logs.waitForLine(t, `"@message":"served SDS secrets"`, `"resource_names":["default","ROOTCA"]`,
			`"spiffe_ids":["spiffe://example.org/web"]`, `"serials":["`+leafSerial(first.Svids[0].X509Svid)+`"]`, `"uid":`, `"selectors":`)
		if strings.Contains(srv.logs.String(), "PRIVATE KEY") {
			t.Error("a private key was logged")
		}
		e.ack()
	})
	second := ca.svidResponse(t, "/web")
	t.Run("rotation push after ACK", func(t *testing.T) {
		v := e.last.GetVersionInfo()
		src.set(uidSelector(), second)
		r := e.next()
		served(r, []string{"default", "ROOTCA"}, second)
		if r.GetVersionInfo() == v {
			t.Errorf("version %q unchanged by a rotation", v)
		}
		e.ack()
	})
	third := ca.svidResponse(t, "/web")
	t.Run("NACK is logged and not answered", func(t *testing.T) {
		e.nack("Failed to load certificate chain from <inline>")
		srv.logs.waitForLine(t, `"@message":"envoy rejected SDS secrets"`, `"error_detail":"Failed to load certificate chain from \u003cinline\u003e"`,
			`"rejected_version":"`+e.last.GetVersionInfo()+`"`)
		// A resend would come before the rotation's push.
		src.set(uidSelector(), third)
		served(e.next(), []string{"default", "ROOTCA"}, third)
		e.ack()
	})
	t.Run("stale request ignored", func(t *testing.T) {
		e.send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, ResponseNonce: "not-the-last-nonce"})
		srv.logs.waitFor(t, `"@message":"ignored stale SDS request"`)
		fourth := ca.svidResponse(t, "/web")
		src.set(uidSelector(), fourth)
		served(e.next(), []string{"default", "ROOTCA"}, fourth)
		e.ack()
	})
	t.Run("new names answered at once", func(t *testing.T) {
		e.subscribe("default", "ROOTCA", "ALL", "spiffe://example.org/web")
		served(e.next(), []string{"default", "ROOTCA", "ALL", "spiffe://example.org/web"}, nil)
		e.ack()
	})
	t.Run("unknown name answered without it", func(t *testing.T) {
		e.subscribe("default", "spiffe://example.org/not-mine")
		served(e.next(), []string{"default"}, nil)
		srv.logs.waitForLine(t, `"unknown_resource_names":["spiffe://example.org/not-mine"]`)
		e.ack()
		e.subscribe("nothing-here")
		r := e.next()
		served(r, nil, nil)
		e.ack()
		// The stream is still up and pushes what it is asked for.
		e.subscribe("default")
		served(e.next(), []string{"default"}, nil)
	})
}

// TestSDSResources checks what each resource name resolves to, through
// FetchSecrets, with no security header.
func TestSDSResources(t *testing.T) {
	ca := newTestCA(t)
	other := newTestCA(t) // stands for other.org's CA
	otherTD := spiffeid.RequireTrustDomainFromString("other.org")
	bundles := &workload.X509BundlesResponse{Bundles: map[string][]byte{
		td.IDString():      ca.Cert.Raw,
		otherTD.IDString(): other.Cert.Raw,
	}}
	src := newEntrySource(t, ca, map[string][]string{"/web": {uidSelector()}, "/db": {uidSelector()}, "/not-mine": {"unix:uid:4242424"}},
		[]string{"/web", "/db", "/not-mine"})
	src.bundles = bundles

	envoyVersion := func(major, minor uint32) *corev3.Node {
		return &corev3.Node{UserAgentVersionType: &corev3.Node_UserAgentBuildVersion{UserAgentBuildVersion: &corev3.BuildVersion{
			Version: &typev3.SemanticVersion{MajorNumber: major, MinorNumber: minor}}}}
	}
	disabledByMetadata := &corev3.Node{Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
		"disable_spiffe_cert_validation": structpb.NewBoolValue(true)}}}
	// Each resource is described as kind:content: tls:<spiffe id>,
	// ca:<trust domains of trusted_ca>, spiffe:<trust domains>.
	tests := []struct {
		name  string
		cfg   SDSConfig
		node  *corev3.Node
		names []string
		want  []string // name=description
	}{
		{name: "default", names: []string{"default"}, want: []string{"default=tls:spiffe://example.org/web"}},
		{name: "a SPIFFE ID", names: []string{"spiffe://example.org/db"}, want: []string{"spiffe://example.org/db=tls:spiffe://example.org/db"}},
		{name: "ROOTCA", names: []string{"ROOTCA"}, want: []string{"ROOTCA=ca:example.org"}},
		{name: "trust domain by name", names: []string{"other.org"}, want: []string{"other.org=ca:other.org"}},
		{name: "trust domain by ID", names: []string{"spiffe://example.org"}, want: []string{"spiffe://example.org=ca:example.org"}},
		{name: "ALL", names: []string{"ALL"}, want: []string{"ALL=spiffe:example.org,other.org"}},
		{name: "ALL disabled in config", cfg: SDSConfig{DisableSPIFFECertValidation: true}, names: []string{"ALL"},
			want: []string{"ALL=ca:example.org,other.org"}},
		{name: "ALL disabled by node metadata", node: disabledByMetadata, names: []string{"ALL"}, want: []string{"ALL=ca:example.org,other.org"}},
		{name: "ALL for Envoy 1.17", node: envoyVersion(1, 17), names: []string{"ALL"}, want: []string{"ALL=ca:example.org,other.org"}},
		{name: "ALL for Envoy 1.18", node: envoyVersion(1, 18), names: []string{"ALL"}, want: []string{"ALL=spiffe:example.org,other.org"}},
		{name: "several, in request order", names: []string{"ROOTCA", "default", "default"},
			want: []string{"ROOTCA=ca:example.org", "default=tls:spiffe://example.org/web"}},
		{name: "configured names", cfg: SDSConfig{DefaultSVIDName: "svid", DefaultBundleName: "bundle", DefaultAllBundlesName: "every"},
			names: []string{"svid", "bundle", "every", "default"},
			want:  []string{"svid=tls:spiffe://example.org/web", "bundle=ca:example.org", "every=spiffe:example.org,other.org"}},
		{name: "unknown or not entitled", names: []string{"nope", "spiffe://example.org/not-mine", "third.org", "spiffe://bad id"}},
		{name: "wildcard", names: nil, want: []string{"spiffe://example.org=ca:example.org", "spiffe://other.org=ca:other.org",
			"spiffe://example.org/web=tls:spiffe://example.org/web", "spiffe://example.org/db=tls:spiffe://example.org/db"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.TrustDomain = td
			srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, SDS: tc.cfg})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := secretv3.NewSecretDiscoveryServiceClient(sdsConn(t, srv.path)).FetchSecrets(ctx,
				&discoveryv3.DiscoveryRequest{Node: tc.node, ResourceNames: tc.names, TypeUrl: secretTypeURL})
			if err != nil {
				t.Fatalf("FetchSecrets: %v", err)
			}
			if resp.GetVersionInfo() == "" || resp.GetNonce() == "" || resp.GetTypeUrl() != secretTypeURL {
				t.Errorf("version %q, nonce %q, type %q: want all set", resp.GetVersionInfo(), resp.GetNonce(), resp.GetTypeUrl())
			}
			names, secrets := decodeSecrets(t, resp)
			var got []string
			for _, n := range names {
				got = append(got, n+"="+describeSecret(t, secrets[n], map[string]*x509.Certificate{"example.org": ca.Cert, "other.org": other.Cert}))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("served\n%q\nwant\n%q", got, tc.want)
			}
		})
	}
}

// describeSecret renders a secret as kind:content (see TestSDSResources),
// checking that every bundle holds exactly its trust domain's CA.
func describeSecret(t *testing.T, s *tlsv3.Secret, cas map[string]*x509.Certificate) string {
	t.Helper()
	tdOf := func(c *x509.Certificate) string {
		for name, ca := range cas {
			if ca.Equal(c) {
				return name
			}
		}
		t.Fatalf("secret %q holds an unknown CA %s", s.GetName(), c.Subject)
		return ""
	}
	switch {
	case s.GetTlsCertificate() != nil:
		id, _ := leafID(t, s)
		return "tls:" + id
	case s.GetValidationContext().GetCustomValidatorConfig() != nil:
		names, byTD := spiffeValidatorTDs(t, s)
		for _, n := range names {
			if len(byTD[n]) != 1 || tdOf(byTD[n][0]) != n {
				t.Errorf("validator entry %s holds %d CAs, not its own", n, len(byTD[n]))
			}
		}
		return "spiffe:" + strings.Join(names, ",")
	default:
		var names []string
		for _, c := range trustedCA(t, s) {
			names = append(names, tdOf(c))
		}
		return "ca:" + strings.Join(names, ",")
	}
}

// TestSDSRefusesBadRequest: a request that is not for secrets, or names
// more resources than any Envoy would, gets InvalidArgument.
func TestSDSRefusesBadRequest(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, SDS: SDSConfig{TrustDomain: td}})
	client := secretv3.NewSecretDiscoveryServiceClient(sdsConn(t, srv.path))
	many := make([]string, maxSDSNames+1)
	for i := range many {
		many[i] = fmt.Sprintf("n%d", i)
	}
	tests := []struct {
		name string
		req  *discoveryv3.DiscoveryRequest
		want string
	}{
		{name: "clusters, not secrets", req: &discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}, want: "type_url"},
		{name: "too many names", req: &discoveryv3.DiscoveryRequest{ResourceNames: many}, want: "too many resource names: 65 (limit 64)"},
		{name: "oversized name", req: &discoveryv3.DiscoveryRequest{ResourceNames: []string{strings.Repeat("a", maxSDSNameSize+1)}}, want: "resource name 0: 2049 bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := client.FetchSecrets(ctx, tc.req)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tc.want) {
				t.Errorf("FetchSecrets: %v, want InvalidArgument with %q", err, tc.want)
			}
			stream, err := client.StreamSecrets(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(tc.req); err != nil {
				t.Fatal(err)
			}
			_, err = stream.Recv()
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tc.want) {
				t.Errorf("StreamSecrets: %v, want InvalidArgument with %q", err, tc.want)
			}
		})
	}
}

// TestSDSMutualTLS: what two Envoys get over SDS is enough for a real
// mTLS handshake over loopback, each side verifying the other against the
// validation context it was served, and a peer from another CA is
// refused.
func TestSDSMutualTLS(t *testing.T) {
	ca := newTestCA(t)
	src := newEntrySource(t, ca, map[string][]string{"/web": {uidSelector()}, "/db": {uidSelector()}}, []string{"/web", "/db"})
	srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: src, SDS: SDSConfig{TrustDomain: td}})

	// get streams names and returns the tls_certificate and the CA pool.
	get := func(svidName string) (tls.Certificate, *x509.CertPool) {
		e := newEnvoy(t, sdsConn(t, srv.path), &corev3.Node{Id: svidName})
		e.subscribe(svidName, "ROOTCA")
		_, secrets := decodeSecrets(t, e.next())
		pool := x509.NewCertPool()
		for _, c := range trustedCA(t, secrets["ROOTCA"]) {
			pool.AddCert(c)
		}
		return keyPair(t, secrets[svidName]), pool
	}
	serverCert, serverPool := get("default")                 // web
	clientCert, clientPool := get("spiffe://example.org/db") // db

	// verifyPeer checks the peer's chain against roots and its SPIFFE ID,
	// as Envoy's validator does (SVIDs carry no DNS name to check).
	verifyPeer := func(roots *x509.CertPool, wantID string, usage x509.ExtKeyUsage) func([][]byte, [][]*x509.Certificate) error {
		return func(raw [][]byte, _ [][]*x509.Certificate) error {
			certs := make([]*x509.Certificate, len(raw))
			for i, r := range raw {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return err
				}
				certs[i] = c
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
				return err
			}
			if len(certs[0].URIs) != 1 || certs[0].URIs[0].String() != wantID {
				return fmt.Errorf("peer is %v, want %s", certs[0].URIs, wantID)
			}
			return nil
		}
	}
	handshake := func(client tls.Certificate) (serverErr, clientErr error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		done := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			s := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAnyClientCert,
				VerifyPeerCertificate: verifyPeer(serverPool, "spiffe://example.org/db", x509.ExtKeyUsageClientAuth), MinVersion: tls.VersionTLS13})
			_ = s.SetDeadline(time.Now().Add(10 * time.Second))
			err = s.Handshake()
			if err == nil {
				_, err = io.WriteString(s, "hello")
			}
			done <- err
		}()
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{Certificates: []tls.Certificate{client}, InsecureSkipVerify: true,
			VerifyPeerCertificate: verifyPeer(clientPool, "spiffe://example.org/web", x509.ExtKeyUsageServerAuth), MinVersion: tls.VersionTLS13})
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			var b [5]byte
			_, err = io.ReadFull(c, b[:])
			_ = c.Close()
		}
		return <-done, err
	}

	t.Run("both served over SDS", func(t *testing.T) {
		if serverErr, clientErr := handshake(clientCert); serverErr != nil || clientErr != nil {
			t.Fatalf("handshake: server %v, client %v", serverErr, clientErr)
		}
	})
	t.Run("client from another CA", func(t *testing.T) {
		stranger := newTestCA(t)
		cert, key := stranger.SVID(t, spiffeid.RequireFromPath(td, "/db"), nil)
		if serverErr, _ := handshake(tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}); serverErr == nil {
			t.Fatal("server accepted a client its ROOTCA does not vouch for")
		}
	})
}

// TestSDSStreamsCountAgainstLimits: SDS streams are calls like the
// others: past the per-connection cap they are refused and counted.
func TestSDSStreamsCountAgainstLimits(t *testing.T) {
	needRoot(t)
	srv, obs := limitedServer(t, Limits{MaxStreamsPerConn: 2})
	cc := sdsConn(t, srv.path)
	for range 2 {
		e := newEnvoy(t, cc, nil)
		e.subscribe("ROOTCA")
		e.next()
	}
	e := newEnvoy(t, cc, nil)
	e.subscribe("ROOTCA")
	select {
	case err := <-e.ended:
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("third stream ended with %v, want ResourceExhausted", err)
		}
	case <-e.resps:
		t.Fatal("third stream on one connection was served past a cap of 2")
	case <-time.After(10 * time.Second):
		t.Fatal("third stream neither served nor refused after 10s")
	}
	if _, open, _ := obs.snapshot(); open["StreamSecrets"] != 2 {
		t.Errorf("open StreamSecrets = %d, want 2", open["StreamSecrets"])
	}
	if got := obs.count(LimitStreamsPerConn); got != 1 {
		t.Errorf("refusals = %d, want 1", got)
	}
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

package workloadapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
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
	"github.com/lanyard-dev/lanyard/internal/testwait"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

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
		SDS: SDSConfig{TrustDomain: td}, Limits: Limits{WarnInterval: time.Hour}})
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
	t.Run("NACK is logged once and not answered; stale request ignored", func(t *testing.T) {
		e.nack("Failed to load certificate chain from <inline>")
		srv.logs.waitForLine(t, `"@message":"envoy rejected SDS secrets"`, `"error_detail":"Failed to load certificate chain from \u003cinline\u003e"`,
			`"rejected_version":"`+e.last.GetVersionInfo()+`"`)
		e.nack("again")
		e.send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, ResponseNonce: "not-the-last-nonce"})
		// Requests are taken in order: the stale one's line means the
		// second NACK was handled too.
		srv.logs.waitFor(t, `"@message":"ignored stale SDS request"`)
		if n := strings.Count(srv.logs.String(), "envoy rejected SDS secrets"); n != 1 {
			t.Errorf("%d NACK lines, want 1 (rate-limited per uid)", n)
		}
		// A resend, of the NACKed content or for the stale request's
		// names, would come before the rotation's push.
		src.set(uidSelector(), third)
		served(e.next(), []string{"default", "ROOTCA"}, third)
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
// more resources than any Envoy would, gets InvalidArgument; DeltaSecrets
// is Unimplemented, as on SPIRE's agent.
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
	t.Run("DeltaSecrets is not served", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := client.DeltaSecrets(ctx)
		if err == nil {
			_, err = stream.Recv()
		}
		if status.Code(err) != codes.Unimplemented {
			t.Errorf("DeltaSecrets: %v, want Unimplemented", err)
		}
	})
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

// TestSDSNonReadingStreamsCoalesce: an Envoy that stops reading costs one
// queued response per SDS stream, whatever the number of rotations, and
// gets the latest state when it reads again (the push streams' tracker,
// sendtrack.go, applied to SDS).
func TestSDSNonReadingStreamsCoalesce(t *testing.T) {
	const streams, rotations = 20, 8
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), bigResponse(t, ca))
	rec := newRecorder()
	counted := &countingSource{fakeSource: src}
	srv := startServerWith(t, Config{SocketPath: socketDir(t) + "/w.sock", Attestor: unixOnly, Source: counted, Observer: rec})

	c := dialRawH2(t, srv.path)
	// A wildcard request: every SVID of the big response, ~25 KiB.
	req, err := proto.Marshal(&discoveryv3.DiscoveryRequest{TypeUrl: secretTypeURL, Node: &corev3.Node{Id: "slow"}})
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]uint32, 0, streams)
	for range streams {
		ids = append(ids, c.openBidi("/"+secretv3.SecretDiscoveryService_ServiceDesc.ServiceName+"/StreamSecrets", req))
	}
	// Each stream subscribed and answered once.
	testwait.For(t, 10*time.Second, "every SDS stream answered", func() bool { return counted.fetches.Load() >= streams })
	if _, open, _ := rec.snapshot(); open["StreamSecrets"] != streams {
		t.Fatalf("open StreamSecrets = %d, want %d", open["StreamSecrets"], streams)
	}
	var latest *workload.X509SVIDResponse
	for range rotations {
		latest = bigResponse(t, ca)
		before := counted.rotate(uidSelector(), latest)
		testwait.For(t, 10*time.Second, "every SDS stream fetched the rotation or is held", func() bool {
			return int(counted.fetches.Load()-before)+int(srv.server.limits.parked.Load()) == streams
		})
	}
	wantSerial := leafSerial(latest.Svids[0].X509Svid)
	counts := c.readMessages(ids, func(msg []byte) bool {
		var r discoveryv3.DiscoveryResponse
		if proto.Unmarshal(msg, &r) != nil {
			return false
		}
		for _, a := range r.GetResources() {
			s := &tlsv3.Secret{}
			if a.UnmarshalTo(s) != nil || s.GetTlsCertificate() == nil {
				continue
			}
			blk, _ := pem.Decode(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			if blk != nil && leafSerial(blk.Bytes) == wantSerial {
				return true
			}
		}
		return false
	})
	for _, id := range ids {
		if counts[id] > 3 {
			t.Errorf("SDS stream %d received %d responses over %d rotations, want at most 3 (first, one queued, latest)", id, counts[id], rotations)
		}
	}
}

// openBidi starts a bidirectional call of fullMethod with one message,
// leaving the client's side open (as Envoy does), and returns its stream
// ID.
func (r *rawH2) openBidi(fullMethod string, msg []byte) uint32 {
	r.t.Helper()
	return r.start(fullMethod, nil, msg, false)
}

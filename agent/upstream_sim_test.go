//go:build cgo

// These tests run the agent's upstream against a real signer on loopback,
// with the go-tpm-tools simulator as the TPM. The simulator needs cgo and is
// a process-wide singleton (simulator.Get blocks until the previous one is
// closed), so no test here runs in parallel and each closes its TPM.

package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/lanyard-dev/lanyard/signer"
	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"
)

const (
	// simX509MaxTTL and the workload "mine"'s x509_ttl: the entry asks for
	// more than the signer grants.
	simX509MaxTTL = 2 * time.Hour
	simMineTTL    = 48 * time.Hour
	// simBackdate is how far before the signing instant the signer starts
	// every certificate (signer/ca.go).
	simBackdate = 10 * time.Second
	// simCallTimeout bounds every call a test makes, so a hang fails the
	// test rather than the whole run.
	simCallTimeout = 30 * time.Second
)

// simTD is the trust domain of every config written here.
func simTD() spiffeid.TrustDomain { return spiffeid.RequireTrustDomainFromString("example.org") }

// fakeEK returns a well-formed EK pin that no simulator TPM has.
func fakeEK(name string) string {
	sum := sha256.Sum256([]byte(name))
	return hex.EncodeToString(sum[:])
}

// simPolicy is a policy whose node "lab" pins labEK and node "other" pins
// otherEK; workload "mine" runs on lab, "theirs" on other. mineNodes
// overrides where "mine" runs.
func simPolicy(labEK, otherEK string, mineNodes ...string) string {
	if len(mineNodes) == 0 {
		mineNodes = []string{"lab"}
	}
	return fmt.Sprintf(`
node "lab" {
  ek_sha256 = [%q]
}
node "other" {
  ek_sha256 = [%q]
}
workload "mine" {
  spiffe_id = "spiffe://example.org/mine"
  nodes     = [%s]
  selectors = ["unix:uid:1000"]
  x509_ttl  = "48h"
}
workload "theirs" {
  spiffe_id = "spiffe://example.org/theirs"
  nodes     = ["other"]
  selectors = ["unix:uid:1001"]
}
`, labEK, otherEK, `"`+strings.Join(mineNodes, `", "`)+`"`)
}

// openSimTPM starts a fresh simulator (so a fresh EK) behind
// OpenTPMChannel and returns it with its EK hash. Closing the TPM at
// cleanup closes the simulator, which frees the singleton for the next test.
func openSimTPM(t testing.TB) (*node.TPM, string) {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("start simulator: %v", err)
	}
	tpm, err := node.OpenTPMChannel(sim)
	if err != nil {
		sim.Close()
		t.Fatalf("OpenTPMChannel: %v", err)
	}
	t.Cleanup(func() {
		if err := tpm.Close(); err != nil {
			t.Errorf("close TPM: %v", err)
		}
	})
	info, err := tpm.Info()
	if err != nil {
		t.Fatalf("TPM Info: %v", err)
	}
	return tpm, info.EKSHA256
}

// simSigner is a signer serving on loopback, and what an agent is given to
// trust it.
type simSigner struct {
	s     *signer.Signer
	addr  string
	dir   string
	trust *x509bundle.Bundle // loaded from the bundle file, as an agent does
}

// startSigner writes a signer config and policySrc to a temp dir, serves
// the signer on 127.0.0.1:0 until cleanup and waits for its bundle file.
func startSigner(t testing.TB, policySrc string) *simSigner {
	t.Helper()
	return startSignerLog(t, policySrc, hclog.NewNullLogger())
}

// newTestSigner writes a signer config (24h CAs, 2h X.509-SVIDs) and
// policySrc to a temp dir and makes the signer, not yet serving.
func newTestSigner(t testing.TB, policySrc string, log hclog.Logger) (*signer.Signer, *signer.Config) {
	t.Helper()
	dir := t.TempDir()
	conf := `
trust_domain = "example.org"
policy_path  = "policy.hcl"
bundle_path  = "bundle.pem"
state_dir    = "state"
ca_ttl       = "24h"
x509_max_ttl = "2h"
`
	for name, src := range map[string]string{"signer.hcl": conf, "policy.hcl": policySrc} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := signer.LoadConfig(filepath.Join(dir, "signer.hcl"))
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	s, err := signer.New(cfg, log)
	if err != nil {
		t.Fatalf("signer.New: %v", err)
	}
	return s, cfg
}

// startSignerLog is startSigner with the signer logging to log.
func startSignerLog(t testing.TB, policySrc string, log hclog.Logger) *simSigner {
	t.Helper()
	s, cfg := newTestSigner(t, policySrc, log)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("signer Serve: %v", err)
		}
	})

	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(cfg.BundlePath); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("signer stopped before writing its bundle: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("signer wrote no bundle at %s", cfg.BundlePath)
		}
		time.Sleep(10 * time.Millisecond)
	}
	trust, err := x509bundle.Load(simTD(), cfg.BundlePath)
	if err != nil {
		t.Fatalf("load signer bundle: %v", err)
	}
	return &simSigner{s: s, addr: lis.Addr().String(), dir: filepath.Dir(cfg.BundlePath), trust: trust}
}

// signerID is the SPIFFE ID the agent authorizes the signer by.
func signerID() spiffeid.ID { return spiffeid.RequireFromSegments(simTD(), "lanyard", "signer") }

// simEnv is one attested agent talking to one signer.
type simEnv struct {
	sig   *simSigner
	ek    string
	u     *signerConn
	res   *signerpb.AttestResult
	other string // the EK hash node "other" pins
}

// newSimEnv starts the simulator and a signer whose policy pins the
// simulator's EK in "lab", then attests an upstream against it.
func newSimEnv(t testing.TB) *simEnv {
	t.Helper()
	tpm, ek := openSimTPM(t)
	other := fakeEK("other")
	sig := startSigner(t, simPolicy(ek, other))
	u := newSimUpstream(t, sig, tpm)
	res, err := u.attestOnce(callCtx(t))
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	return &simEnv{sig: sig, ek: ek, u: u, res: res, other: other}
}

func newSimUpstream(t testing.TB, sig *simSigner, tpm *node.TPM) *signerConn {
	t.Helper()
	u, err := newSignerConn(newReplicaSet([]string{sig.addr}, nil), simTD(), newTPMLink(tpm, nil, nil), sig.trust, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("newSignerConn: %v", err)
	}
	t.Cleanup(u.close)
	return u
}

func callCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), simCallTimeout)
	t.Cleanup(cancel)
	return ctx
}

// client is the upstream's mTLS signer client, which exists once attested.
func (e *simEnv) client(t testing.TB) signerpb.SignerClient {
	t.Helper()
	c, _ := e.u.client()
	if c == nil {
		t.Fatal("upstream has no connection after attesting")
	}
	return c
}

// firstSync opens a Sync stream and returns it with its first message.
func (e *simEnv) firstSync(t testing.TB) (grpc.ServerStreamingClient[signerpb.SyncResponse], *signerpb.SyncResponse) {
	t.Helper()
	stream, err := e.client(t).Sync(callCtx(t), &signerpb.SyncRequest{})
	if err != nil {
		t.Fatalf("Sync: %v", err)
	}
	msg, err := stream.Recv()
	if err != nil {
		t.Fatalf("Sync first message: %v", err)
	}
	return stream, msg
}

// dialSigner is a client of the signer with the given TLS credentials,
// closed at cleanup.
func dialSigner(t *testing.T, addr string, tlsConf *tls.Config) signerpb.SignerClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return signerpb.NewSignerClient(conn)
}

// syncOnce opens a Sync stream and returns its first message or the error
// that ended it.
func syncOnce(t *testing.T, client signerpb.SignerClient) (*signerpb.SyncResponse, error) {
	t.Helper()
	stream, err := client.Sync(callCtx(t), &signerpb.SyncRequest{})
	if err != nil {
		return nil, err
	}
	return stream.Recv()
}

// newCSR returns a DER CSR for a fresh in-memory key; tmpl may ask for
// names the signer must ignore.
func newCSR(t *testing.T, tmpl *x509.CertificateRequest) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func TestUpstreamAttestIssuesAgentSVID(t *testing.T) {
	e := newSimEnv(t)
	wantID := "spiffe://example.org/lanyard/agent/tpm/" + e.ek

	svid := e.u.agentSVID()
	if svid == nil {
		t.Fatal("no agent SVID after attest")
	}
	if svid.ID.String() != wantID {
		t.Errorf("agent SVID ID = %s, want %s", svid.ID, wantID)
	}
	leaf := svid.Certificates[0]
	if len(e.res.GetSvid()) == 0 || string(e.res.GetSvid()[0]) != string(leaf.Raw) {
		t.Errorf("installed SVID is not the leaf of the attest result")
	}
	e.u.mu.Lock()
	sessPub := e.u.sess.Signer().Public()
	e.u.mu.Unlock()
	if !publicKeysEqual(leaf.PublicKey, sessPub) {
		t.Errorf("agent SVID public key is not the TPM session key")
	}
	if !publicKeysEqual(svid.PrivateKey.Public(), sessPub) {
		t.Errorf("agent SVID private key is not the TPM session signer")
	}
	if id, _, err := x509svid.Verify(svid.Certificates, e.sig.trust); err != nil || id.String() != wantID {
		t.Errorf("agent SVID against the signer bundle: id %s, err %v", id, err)
	}
	wantSel := "tpm:ek-sha256:" + e.ek
	if !slices.Contains(e.res.GetNodeSelectors(), wantSel) {
		t.Errorf("node selectors %q lack %q", e.res.GetNodeSelectors(), wantSel)
	}
	if got := e.res.GetBundle().GetTrustDomain(); got != "example.org" {
		t.Errorf("attest result bundle trust domain = %q, want example.org", got)
	}
}

func TestUpstreamSyncSendsOnlyTheNodesEntries(t *testing.T) {
	e := newSimEnv(t)
	_, msg := e.firstSync(t)

	want := []*signerpb.Entry{{
		Id:             "mine",
		SpiffeId:       "spiffe://example.org/mine",
		Selectors:      []string{"unix:uid:1000"},
		X509TtlSeconds: int64(simMineTTL / time.Second), // the entry's value: the cap applies at signing
		JwtTtlSeconds:  int64(policy.DefaultJWTTTL / time.Second),
	}}
	if diff := cmp.Diff(want, msg.GetEntries(), protocmp.Transform(), protocmp.IgnoreFields(&signerpb.Entry{}, "revision")); diff != "" {
		t.Errorf("synced entries mismatch (-want +got):\n%s", diff)
	}
	for _, en := range msg.GetEntries() {
		if en.GetRevision() == 0 {
			t.Errorf("entry %q has revision 0", en.GetId())
		}
	}
	b := msg.GetBundle()
	var authorities [][]byte
	for _, c := range e.sig.trust.X509Authorities() {
		authorities = append(authorities, c.Raw)
	}
	if b.GetTrustDomain() != "example.org" || b.GetSequence() == 0 || !cmp.Equal(authorities, b.GetX509Authorities()) {
		t.Errorf("synced bundle: trust domain %q, sequence %d, %d authorities; want example.org, non-zero, the bundle file's %d",
			b.GetTrustDomain(), b.GetSequence(), len(b.GetX509Authorities()), len(authorities))
	}
}

func TestUpstreamSignX509SVIDs(t *testing.T) {
	e := newSimEnv(t)
	_, msg := e.firstSync(t)
	if len(msg.GetEntries()) != 1 {
		t.Fatalf("synced %d entries, want 1", len(msg.GetEntries()))
	}
	mineID := msg.GetEntries()[0].GetSpiffeId()

	forged, forgedKey := newCSR(t, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: "admin"},
		URIs:     []*url.URL{{Scheme: "spiffe", Host: "example.org", Path: "/admin"}},
		DNSNames: []string{"admin.example.org"},
	})
	plain, _ := newCSR(t, nil)
	badSig := slices.Clone(plain)
	badSig[len(badSig)-1] ^= 1 // the last byte is the signature's

	tests := []struct {
		name     string
		csrs     []*signerpb.CSR
		wantCode codes.Code
		wantErr  string // per-entry error; "" means a chain is expected
	}{
		{name: "own entry, forged SANs ignored, TTL capped", csrs: []*signerpb.CSR{{EntryId: "mine", Csr: forged}}},
		{name: "another node's entry", csrs: []*signerpb.CSR{{EntryId: "theirs", Csr: plain}}, wantErr: `entry "theirs": entry is not authorized`},
		{name: "unknown entry", csrs: []*signerpb.CSR{{EntryId: "nosuch", Csr: plain}}, wantErr: `entry "nosuch": entry is not authorized`},
		{name: "garbage CSR", csrs: []*signerpb.CSR{{EntryId: "mine", Csr: []byte("not a CSR")}}, wantErr: `entry "mine": parse CSR`},
		{name: "CSR signature broken", csrs: []*signerpb.CSR{{EntryId: "mine", Csr: badSig}}, wantErr: `entry "mine": CSR signature`},
		{name: "too many CSRs", csrs: slices.Repeat([]*signerpb.CSR{{EntryId: "mine", Csr: plain}}, 1001), wantCode: codes.InvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := time.Now()
			resp, err := e.client(t).SignX509SVIDs(callCtx(t), &signerpb.SignX509SVIDsRequest{Csrs: tc.csrs})
			after := time.Now()
			if status.Code(err) != tc.wantCode {
				t.Fatalf("SignX509SVIDs error = %v, want code %v", err, tc.wantCode)
			}
			if err != nil {
				return
			}
			if len(resp.GetSvids()) != 1 {
				t.Fatalf("got %d results, want one", len(resp.GetSvids()))
			}
			got := resp.GetSvids()[0]
			if got.GetEntryId() != tc.csrs[0].GetEntryId() {
				t.Errorf("result is for entry %q, want %q", got.GetEntryId(), tc.csrs[0].GetEntryId())
			}
			if tc.wantErr != "" {
				if !strings.Contains(got.GetError(), tc.wantErr) || len(got.GetChain()) != 0 {
					t.Fatalf("result: error %q with %d certificates, want an error containing %q and no chain", got.GetError(), len(got.GetChain()), tc.wantErr)
				}
				return
			}
			if got.GetError() != "" || len(got.GetChain()) == 0 {
				t.Fatalf("result: error %q with %d certificates, want a chain", got.GetError(), len(got.GetChain()))
			}
			checkWorkloadSVID(t, got.GetChain(), e.sig.trust, mineID, forgedKey, before, after)
		})
	}
}

// checkWorkloadSVID checks a signed chain: the entry's ID as its only name,
// the CSR's key, a lifetime of x509_max_ttl from the signing instant, and a
// chain to the bundle.
func checkWorkloadSVID(t *testing.T, chain [][]byte, trust *x509bundle.Bundle, wantID string, key *ecdsa.PrivateKey, before, after time.Time) {
	t.Helper()
	id, _, err := x509svid.ParseAndVerify(chain, trust)
	if err != nil {
		t.Fatalf("issued SVID does not verify against the bundle: %v", err)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		t.Fatal(err)
	}
	var uris []string
	for _, u := range leaf.URIs {
		uris = append(uris, u.String())
	}
	if diff := cmp.Diff([]string{wantID}, uris); diff != "" || id.String() != wantID {
		t.Errorf("issued SVID names (-want +got):\n%s(verified ID %s)", diff, id)
	}
	if len(leaf.DNSNames) != 0 || leaf.Subject.CommonName != "" {
		t.Errorf("issued SVID carries the CSR's DNS names %q / CN %q", leaf.DNSNames, leaf.Subject.CommonName)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		t.Errorf("issued SVID is not for the CSR's key")
	}
	// Certificate times have whole seconds; both ends come from one instant.
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != simX509MaxTTL+simBackdate {
		t.Errorf("lifetime = %v, want x509_max_ttl %v plus the %v backdate", got, simX509MaxTTL, simBackdate)
	}
	lo, hi := before.Truncate(time.Second).Add(simX509MaxTTL), after.Add(simX509MaxTTL)
	if leaf.NotAfter.Before(lo) || leaf.NotAfter.After(hi) {
		t.Errorf("NotAfter = %v, want within [%v, %v]", leaf.NotAfter, lo, hi)
	}
}

func TestSignerRefusesCallsWithoutAgentSVID(t *testing.T) {
	e := newSimEnv(t)
	// A workload SVID chains to the bundle, so the TLS layer lets it
	// through; only the signer's check of the path refuses it.
	csr, key := newCSR(t, nil)
	resp, err := e.client(t).SignX509SVIDs(callCtx(t), &signerpb.SignX509SVIDsRequest{Csrs: []*signerpb.CSR{{EntryId: "mine", Csr: csr}}})
	if err != nil || len(resp.GetSvids()) != 1 || len(resp.GetSvids()[0].GetChain()) == 0 {
		t.Fatalf("sign a workload SVID: %v %v", resp, err)
	}
	leaf, err := x509.ParseCertificate(resp.GetSvids()[0].GetChain()[0])
	if err != nil {
		t.Fatal(err)
	}
	workload := &x509svid.SVID{ID: spiffeid.RequireFromString("spiffe://example.org/mine"), Certificates: []*x509.Certificate{leaf}, PrivateKey: key}

	authz := tlsconfig.AuthorizeID(signerID())
	tests := []struct {
		name string
		tls  *tls.Config
		want codes.Code
	}{
		{"no client certificate", tlsconfig.TLSClientConfig(e.sig.trust, authz), codes.Unauthenticated},
		{"workload SVID", tlsconfig.MTLSClientConfig(workload, e.sig.trust, authz), codes.PermissionDenied},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client := dialSigner(t, e.sig.addr, tc.tls)
			msg, err := syncOnce(t, client)
			if status.Code(err) != tc.want {
				t.Errorf("Sync: message %v, error %v; want code %v", msg, err, tc.want)
			}
			_, err = client.SignX509SVIDs(callCtx(t), &signerpb.SignX509SVIDsRequest{Csrs: []*signerpb.CSR{{EntryId: "mine", Csr: csr}}})
			if status.Code(err) != tc.want {
				t.Errorf("SignX509SVIDs error = %v, want code %v", err, tc.want)
			}
		})
	}
}

func TestPolicyChangeReachesOpenSync(t *testing.T) {
	tests := []struct {
		name string
		// policy is the new policy, given the simulator's EK and the
		// other node's.
		policy func(ek, other string) string
		// Dropping the EK forgets the agent: the stream ends and every
		// call needs a new attestation. Moving the workload keeps the
		// agent: the stream pushes the shorter entry list.
		wantStreamCode codes.Code
		wantSignCode   codes.Code
		wantSignErr    string
	}{
		{
			name:           "node no longer pins the EK",
			policy:         func(_, other string) string { return simPolicy(fakeEK("replacement"), other) },
			wantStreamCode: codes.Unauthenticated,
			wantSignCode:   codes.Unauthenticated,
		},
		{
			name:        "workload moved to another node",
			policy:      func(ek, other string) string { return simPolicy(ek, other, "other") },
			wantSignErr: `entry "mine": entry is not authorized`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newSimEnv(t)
			stream, first := e.firstSync(t)
			if len(first.GetEntries()) != 1 {
				t.Fatalf("first sync has %d entries, want 1", len(first.GetEntries()))
			}
			p, err := policy.Parse([]byte(tc.policy(e.ek, e.other)), filepath.Join(e.sig.dir, "policy.hcl"), simTD())
			if err != nil {
				t.Fatalf("parse new policy: %v", err)
			}
			e.sig.s.SetPolicy(p)

			msg, err := stream.Recv()
			if status.Code(err) != tc.wantStreamCode {
				t.Fatalf("Sync after the policy change: message %v, error %v; want code %v", msg, err, tc.wantStreamCode)
			}
			if err == nil && len(msg.GetEntries()) != 0 {
				t.Errorf("Sync after the policy change sent entries %v, want none", msg.GetEntries())
			}

			csr, _ := newCSR(t, nil)
			resp, err := e.client(t).SignX509SVIDs(callCtx(t), &signerpb.SignX509SVIDsRequest{Csrs: []*signerpb.CSR{{EntryId: "mine", Csr: csr}}})
			if status.Code(err) != tc.wantSignCode {
				t.Fatalf("SignX509SVIDs error = %v, want code %v", err, tc.wantSignCode)
			}
			if err == nil {
				got := resp.GetSvids()
				if len(got) != 1 || !strings.Contains(got[0].GetError(), tc.wantSignErr) || len(got[0].GetChain()) != 0 {
					t.Errorf("SignX509SVIDs results %v, want one refusal containing %q", got, tc.wantSignErr)
				}
			}
		})
	}
}

func TestAttestRefusesUnpinnedEK(t *testing.T) {
	tpm, _ := openSimTPM(t)
	sig := startSigner(t, simPolicy(fakeEK("someone else"), fakeEK("other")))
	u := newSimUpstream(t, sig, tpm)

	_, err := u.attestOnce(callCtx(t))
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "EK") {
		t.Fatalf("attest error = %v, want PermissionDenied naming the EK", err)
	}
	if u.agentSVID() != nil {
		t.Error("a refused attestation installed an agent SVID")
	}
	if c, _ := u.client(); c != nil {
		t.Error("a refused attestation installed a connection")
	}
}

// TestPolicyChangeDuringAttestation removes the TPM from policy between
// the signer's challenge and the agent's answer: the agent must not end up
// with the node's entries.
func TestPolicyChangeDuringAttestation(t *testing.T) {
	tpm, ek := openSimTPM(t)
	other := fakeEK("other")
	sig := startSigner(t, simPolicy(ek, other))
	sess, err := tpm.NewSession()
	if err != nil {
		t.Fatalf("NewSession: %v", err)
	}
	t.Cleanup(func() { sess.Close() })
	ev, err := sess.Evidence()
	if err != nil {
		t.Fatalf("Evidence: %v", err)
	}
	authz := tlsconfig.AuthorizeID(signerID())
	stream, err := dialSigner(t, sig.addr, tlsconfig.TLSClientConfig(sig.trust, authz)).Attest(callCtx(t))
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_Evidence{Evidence: &signerpb.Evidence{
		EkPublic: ev.EKPublic,
		Ak:       &signerpb.TPMObject{Public: ev.AK.Public, CreateData: ev.AK.CreateData, CreateAttestation: ev.AK.CreateAttestation, CreateSignature: ev.AK.CreateSignature},
		Key:      &signerpb.TPMObject{Public: ev.Key.Public, CreateData: ev.Key.CreateData, CreateAttestation: ev.Key.CreateAttestation, CreateSignature: ev.Key.CreateSignature},
		Csr:      ev.CSR,
	}}}); err != nil {
		t.Fatalf("send evidence: %v", err)
	}
	resp, err := stream.Recv()
	if err != nil || resp.GetChallenge() == nil {
		t.Fatalf("challenge: %v %v", resp, err)
	}

	p, err := policy.Parse([]byte(simPolicy(fakeEK("replacement"), other)), filepath.Join(sig.dir, "policy.hcl"), simTD())
	if err != nil {
		t.Fatalf("parse new policy: %v", err)
	}
	sig.s.SetPolicy(p)

	secret, err := sess.Activate(attest.EncryptedCredential{Credential: resp.GetChallenge().GetCredential(), Secret: resp.GetChallenge().GetSecret()})
	if err != nil {
		t.Fatalf("Activate: %v", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_ActivationSecret{ActivationSecret: secret}}); err != nil {
		t.Fatalf("send answer: %v", err)
	}
	resp, err = stream.Recv()
	if err != nil {
		// Refusing the attestation outright is one correct outcome.
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("attestation error = %v, want PermissionDenied or an agent the signer forgets", err)
		}
		return
	}
	leaf, err := x509.ParseCertificate(resp.GetResult().GetSvid()[0])
	if err != nil {
		t.Fatal(err)
	}
	agentSVID := &x509svid.SVID{ID: spiffeid.RequireFromPath(simTD(), "/lanyard/agent/tpm/"+ek), Certificates: []*x509.Certificate{leaf}, PrivateKey: sess.Signer()}
	msg, err := syncOnce(t, dialSigner(t, sig.addr, tlsconfig.MTLSClientConfig(agentSVID, sig.trust, authz)))
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("Sync of an agent whose EK left policy mid-attestation: entries %v, error %v; want Unauthenticated", msg.GetEntries(), err)
	}
}

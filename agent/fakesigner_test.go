package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeSigner is an in-memory signer for the loops' tests: it implements
// signerLink and x509Signer with real certificates and no network, so the
// upstream and the renewer run inside a synctest bubble on fake time. It
// signs as the real signer does: the SPIFFE ID from the entry, the
// revision it was asked for, NotBefore backdated, NotAfter now + ttl.
type fakeSigner struct {
	td       spiffeid.TrustDomain
	ttl      time.Duration // workload SVIDs
	agentTTL time.Duration

	changed broadcast // entries, CA or availability changed: sync streams look again
	newCon  broadcast // an attestation replaced the connection
	back    broadcast // the signer came back up

	mu       sync.Mutex
	cas      []*testCA // the bundle, oldest first
	active   int       // the one that signs
	entries  []*signerpb.Entry
	fed      []*signerpb.Bundle // federated_bundles of every sync message
	fedGen   int                // counts setFederated calls: each is sent
	down     bool
	unknown  bool // answers Unauthenticated until the next attestation
	attested bool
	attests  int
	signs    []signCall
}

// signCall is one SignX509SVIDs call the fake answered or refused.
type signCall struct {
	at   time.Time
	csrs int
	ok   bool
}

func newFakeSigner(t testing.TB, ttl time.Duration, entries ...*signerpb.Entry) *fakeSigner {
	f := &fakeSigner{td: spiffeid.RequireTrustDomainFromString("example.org"), ttl: ttl, agentTTL: time.Hour, entries: entries}
	f.rotateCA(t)
	return f
}

// activateCA makes the newest CA sign, as the real signer does once its
// successor has been published for ca_publish_lead.
func (f *fakeSigner) activateCA() {
	f.mu.Lock()
	f.active = len(f.cas) - 1
	f.mu.Unlock()
}

// rotateCA publishes a new CA in the bundle; it signs only once
// activateCA is called (the first one signs at once). The old ones stay.
func (f *fakeSigner) rotateCA(t testing.TB) {
	t.Helper()
	ca := newTestCA(t, "fake CA")
	f.mu.Lock()
	f.cas = append(f.cas, ca)
	f.mu.Unlock()
	f.changed.notify()
}

func (f *fakeSigner) setDown(down bool) {
	f.mu.Lock()
	f.down = down
	f.mu.Unlock()
	f.changed.notify()
	if !down {
		f.back.notify()
	}
}

// forget makes the signer refuse the agent until it attests again, as a
// restarted signer does.
func (f *fakeSigner) forget() {
	f.mu.Lock()
	f.unknown = true
	f.mu.Unlock()
	f.changed.notify()
}

func (f *fakeSigner) setEntries(entries ...*signerpb.Entry) {
	f.mu.Lock()
	f.entries = entries
	f.mu.Unlock()
	f.changed.notify()
}

// setFederated replaces the federated bundles the sync stream pushes.
func (f *fakeSigner) setFederated(bundles ...*signerpb.Bundle) {
	f.mu.Lock()
	f.fed = bundles
	f.fedGen++
	f.mu.Unlock()
	f.changed.notify()
}

func (f *fakeSigner) calls() []signCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]signCall(nil), f.signs...)
}

func (f *fakeSigner) attestCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.attests
}

var errFakeDown = status.Error(codes.Unavailable, "connection refused")

// refusalLocked is why a call fails now, if it does.
func (f *fakeSigner) refusalLocked() error {
	switch {
	case f.down:
		return errFakeDown
	case f.unknown:
		return status.Error(codes.Unauthenticated, "agent is not attested with this signer (restarted): attest again")
	}
	return nil
}

func (f *fakeSigner) bundleLocked() *signerpb.Bundle {
	b := &signerpb.Bundle{TrustDomain: f.td.String(), Sequence: uint64(len(f.cas))}
	for _, ca := range f.cas {
		b.X509Authorities = append(b.X509Authorities, ca.Cert.Raw)
	}
	return b
}

// issueLocked signs a leaf for id and pub with the current CA.
func (f *fakeSigner) issueLocked(id spiffeid.ID, pub any, ttl time.Duration) (*x509.Certificate, error) {
	ca := f.cas[f.active]
	now := time.Now()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: now.Add(-10 * time.Second), NotAfter: now.Add(ttl),
		URIs: []*url.URL{id.URL()}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func (f *fakeSigner) attest(ctx context.Context) (*signerpb.AttestResult, *x509svid.SVID, error) {
	f.mu.Lock()
	if f.down {
		f.mu.Unlock()
		return nil, nil, errFakeDown
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.mu.Unlock()
		return nil, nil, err
	}
	id := spiffeid.RequireFromPath(f.td, agentPathPrefix+"ab12")
	leaf, err := f.issueLocked(id, key.Public(), f.agentTTL)
	if err != nil {
		f.mu.Unlock()
		return nil, nil, err
	}
	f.attested, f.unknown = true, false
	f.attests++
	res := &signerpb.AttestResult{Svid: [][]byte{leaf.Raw}, Bundle: f.bundleLocked(), NodeSelectors: []string{"lab"}}
	f.mu.Unlock()
	f.newCon.notify()
	return res, &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}, nil
}

func (f *fakeSigner) sync(ctx context.Context) (func() (*signerpb.SyncResponse, error), <-chan struct{}, error) {
	replaced := f.newCon.C()
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.attested {
		return nil, replaced, errNotConnected
	}
	if err := f.refusalLocked(); err != nil {
		return nil, replaced, err
	}
	var sent *signerpb.SyncResponse
	sentGen := 0
	recv := func() (*signerpb.SyncResponse, error) {
		for {
			wake := f.changed.C()
			f.mu.Lock()
			err := f.refusalLocked()
			msg := &signerpb.SyncResponse{Bundle: f.bundleLocked(), Entries: f.entries, FederatedBundles: f.fed}
			gen := f.fedGen
			f.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if sent == nil || len(msg.GetBundle().GetX509Authorities()) != len(sent.GetBundle().GetX509Authorities()) ||
				!sameEntries(msg.GetEntries(), sent.GetEntries()) || gen != sentGen {
				sent, sentGen = msg, gen
				return msg, nil
			}
			select {
			case <-wake:
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			}
		}
	}
	return recv, replaced, nil
}

func sameEntries(a, b []*signerpb.Entry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func (f *fakeSigner) signX509SVIDs(ctx context.Context, req *signerpb.SignX509SVIDsRequest) (*signerpb.SignX509SVIDsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.refusalLocked(); err != nil {
		f.signs = append(f.signs, signCall{at: time.Now(), csrs: len(req.GetCsrs())})
		return nil, err
	}
	f.signs = append(f.signs, signCall{at: time.Now(), csrs: len(req.GetCsrs()), ok: true})
	resp := &signerpb.SignX509SVIDsResponse{}
	for _, c := range req.GetCsrs() {
		var e *signerpb.Entry
		for _, x := range f.entries {
			if x.GetId() == c.GetEntryId() {
				e = x
			}
		}
		if e == nil {
			resp.Svids = append(resp.Svids, &signerpb.SignedX509SVID{EntryId: c.GetEntryId(), Error: "no such entry in the policy"})
			continue
		}
		csr, err := x509.ParseCertificateRequest(c.GetCsr())
		if err != nil {
			return nil, err
		}
		leaf, err := f.issueLocked(spiffeid.RequireFromString(e.GetSpiffeId()), csr.PublicKey, f.ttl)
		if err != nil {
			return nil, err
		}
		chain := [][]byte{leaf.Raw}
		resp.Svids = append(resp.Svids, &signerpb.SignedX509SVID{EntryId: e.GetId(), Chain: chain, Revision: e.GetRevision()})
	}
	return resp, nil
}

func (f *fakeSigner) mintJWTSVIDs(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.refusalLocked(); err != nil {
		return nil, err
	}
	return nil, status.Error(codes.Unimplemented, "the fake mints no JWT-SVIDs")
}

func (f *fakeSigner) replaced() <-chan struct{} { return f.newCon.C() }

// becameReady: while the signer is down, the connection comes up when it
// is back, as gRPC's redial finds it.
func (f *fakeSigner) becameReady(ctx context.Context) <-chan struct{} {
	back := f.back.C()
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.down {
		return nil
	}
	return back
}

func (f *fakeSigner) resetBackoff() {}

// wireEntry is a policy entry as the signer sends it.
func wireEntry(id string, rev uint64, selectors ...string) *signerpb.Entry {
	return &signerpb.Entry{Id: id, SpiffeId: "spiffe://example.org/" + id, Selectors: selectors, Revision: rev, X509TtlSeconds: 10}
}

package agent

import (
	"cmp"
	"context"
	"crypto"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/lanyard-dev/lanyard/proto/signerpb"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// attestTimeout bounds one attestation round trip with the signer.
const attestTimeout = 30 * time.Second

// mintTimeout bounds one MintJWTSVIDs call: a caller is waiting.
const mintTimeout = 10 * time.Second

// connectParams caps gRPC's own reconnect backoff (120 s by default) at a
// second, so that a signer that comes back is seen within a second: the
// agent's loops wait for the connection to come up (waitRetry) rather than
// for their own, longer, backoff. While the signer is down that is one
// refused TCP connect per second per agent, which a host answers from the
// kernel; the herd of a fleet reconnecting at once is spread by the jitter
// and capped by the signer's own limits.
var connectParams = grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: 250 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
	MinConnectTimeout: 5 * time.Second,
}

// syncConnectWait bounds how long opening the sync stream waits for the
// connection to come up. Without waiting, a call made in the instant the
// connection is still marked down from the last refused attempt fails at
// once; with it, the stream opens as soon as the signer answers.
const syncConnectWait = 10 * time.Second

// errNotConnected is returned by calls on the signer connection before
// the first attestation made one.
var errNotConnected = errors.New("not connected to the signer")

// signerConn is the agent's real link to the signer API (signerLink). It
// owns the agent's identity: a TPM session whose key never leaves the
// TPM, the SVID the signer issued for that key, and the mTLS connection
// that uses both. Each attestation replaces all three.
type signerConn struct {
	replicas *replicaSet // which signer replica to attest with
	signerID spiffeid.ID
	tpm      *tpmLink
	trust    *x509bundle.Bundle // what the signer is verified against; the upstream keeps it current
	log      hclog.Logger
	newCon   broadcast // a new connection replaced conn

	mu   sync.Mutex
	addr string // the replica conn goes to
	sess *node.Session
	svid *x509svid.SVID
	conn *grpc.ClientConn
}

func newSignerConn(replicas *replicaSet, td spiffeid.TrustDomain, tpm *tpmLink, trust *x509bundle.Bundle, log hclog.Logger) (*signerConn, error) {
	id, err := spiffeid.FromSegments(td, "lanyard", "signer")
	if err != nil {
		return nil, fmt.Errorf("signer ID: %w", err)
	}
	return &signerConn{replicas: replicas, signerID: id, tpm: tpm, trust: trust, log: log}, nil
}

// GetX509SVID implements x509svid.Source for the mTLS client config: the
// private key is the TPM-resident signer.
func (u *signerConn) GetX509SVID() (*x509svid.SVID, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.svid == nil {
		return nil, errors.New("agent is not attested yet")
	}
	return u.svid, nil
}

// client returns the signer client on the current mTLS connection (nil
// before the first attestation) and a channel closed once that
// connection is replaced.
func (u *signerConn) client() (signerpb.SignerClient, <-chan struct{}) {
	u.mu.Lock()
	defer u.mu.Unlock()
	replaced := u.newCon.C()
	if u.conn == nil {
		return nil, replaced
	}
	return signerpb.NewSignerClient(u.conn), replaced
}

// replaced returns a channel closed once the current connection is
// replaced by a new attestation.
func (u *signerConn) replaced() <-chan struct{} { return u.newCon.C() }

// attest proves the TPM to a signer replica and installs the resulting
// identity and connection. On failure the previous identity stays in
// place. A replica that cannot be reached is recorded as failed and
// another tried at once, each at most once (see replicaSet.choose); a
// refusal ends the attempt, since every replica would say the same.
func (u *signerConn) attest(ctx context.Context) (*signerpb.AttestResult, *x509svid.SVID, error) {
	var tried []string
	err := errNoSignerAddress
	for {
		target, ok := u.replicas.choose(ctx, time.Now(), tried)
		if !ok {
			return nil, nil, err
		}
		var res *signerpb.AttestResult
		res, err = u.attestTo(ctx, target)
		if err == nil {
			return res, u.agentSVID(), nil
		}
		if ctx.Err() != nil || !unreachable(err) {
			return nil, nil, err
		}
		u.replicas.failed(target.addr, err, time.Now())
		tried = append(tried, target.addr)
		u.log.Warn("signer replica unreachable", "signer", target.addr, "error", err)
	}
}

// attestOnce attests with the replica the set chooses, trying no other.
func (u *signerConn) attestOnce(ctx context.Context) (*signerpb.AttestResult, error) {
	target, ok := u.replicas.choose(ctx, time.Now(), nil)
	if !ok {
		return nil, errNoSignerAddress
	}
	return u.attestTo(ctx, target)
}

// agentSVID returns the current agent SVID (nil before the first
// attestation).
func (u *signerConn) agentSVID() *x509svid.SVID {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.svid
}

// attestTo attests with one replica and, on success, makes it the one in
// use.
func (u *signerConn) attestTo(ctx context.Context, target replica) (*signerpb.AttestResult, error) {
	ctx, cancel := context.WithTimeout(ctx, attestTimeout)
	defer cancel()
	// A session lives on the TPM it was made on: after a reopen, a new
	// attestation makes a new AK and key on the new TPM.
	tpm, err := u.tpm.current()
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	sess, err := tpm.NewSession()
	if err != nil {
		u.tpm.check(tpm)
		return nil, fmt.Errorf("attest: %w", err)
	}
	keep := false
	defer func() {
		if !keep {
			sess.Close()
		}
	}()
	ev, err := sess.Evidence()
	if err != nil {
		u.tpm.check(tpm)
		return nil, fmt.Errorf("attest: %w", err)
	}
	addr := target.addr
	var attestParams []grpc.DialOption
	if u.replicas.several() {
		// Another replica could serve: do not wait gRPC's 20 s for one
		// whose host is gone.
		attestParams = append(attestParams, grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: replicaConnectTimeout}))
	}
	conn, err := grpc.NewClient(addr, target.dialOptions(tlsconfig.TLSClientConfig(u.trust, tlsconfig.AuthorizeID(u.signerID)), attestParams...)...)
	if err != nil {
		return nil, fmt.Errorf("attest: dial %s: %w", addr, err)
	}
	defer conn.Close()
	// The signer lists the version in its node registry.
	ctx = metadata.AppendToOutgoingContext(ctx, signerpb.AgentVersionHeader, cli.Version())
	stream, err := signerpb.NewSignerClient(conn).Attest(ctx)
	if err != nil {
		return nil, fmt.Errorf("attest: signer %s: %w", addr, err)
	}
	err = stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_Evidence{Evidence: &signerpb.Evidence{
		EkCertificate: ev.EKCertificate,
		EkPublic:      ev.EKPublic,
		Ak:            &signerpb.TPMObject{Public: ev.AK.Public, CreateData: ev.AK.CreateData, CreateAttestation: ev.AK.CreateAttestation, CreateSignature: ev.AK.CreateSignature},
		Key:           &signerpb.TPMObject{Public: ev.Key.Public, CreateData: ev.Key.CreateData, CreateAttestation: ev.Key.CreateAttestation, CreateSignature: ev.Key.CreateSignature},
		Csr:           ev.CSR,
	}}})
	if err != nil {
		return nil, fmt.Errorf("attest: send evidence to %s: %w", addr, err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("attest: signer %s: %w", addr, err)
	}
	ch := resp.GetChallenge()
	if ch == nil {
		return nil, fmt.Errorf("attest: signer %s sent no challenge", addr)
	}
	secret, err := sess.Activate(attest.EncryptedCredential{Credential: ch.GetCredential(), Secret: ch.GetSecret()})
	if err != nil {
		u.tpm.check(tpm)
		return nil, fmt.Errorf("attest: %w", err)
	}
	if err := stream.Send(&signerpb.AttestRequest{Step: &signerpb.AttestRequest_ActivationSecret{ActivationSecret: secret}}); err != nil {
		return nil, fmt.Errorf("attest: send activation answer: %w", err)
	}
	resp, err = stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("attest: signer %s: %w", addr, err)
	}
	res := resp.GetResult()
	if res == nil || len(res.GetSvid()) == 0 {
		return nil, fmt.Errorf("attest: signer %s sent no SVID", addr)
	}
	svid, err := u.agentSVIDFrom(res, sess)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}

	mtls := tlsconfig.MTLSClientConfig(u, u.trust, tlsconfig.AuthorizeID(u.signerID))
	newConn, err := grpc.NewClient(addr, target.dialOptions(mtls, grpc.WithConnectParams(connectParams))...)
	if err != nil {
		return nil, fmt.Errorf("attest: dial %s: %w", addr, err)
	}
	keep = true
	u.replicas.use(target)
	u.mu.Lock()
	oldSess, oldConn := u.sess, u.conn
	u.sess, u.svid, u.conn, u.addr = sess, svid, newConn, addr
	u.newCon.notify()
	u.mu.Unlock()
	// The old key may still be signing a handshake on the old connection:
	// close the connection first, then flush the key from the TPM.
	if oldConn != nil {
		oldConn.Close()
	}
	if oldSess != nil {
		oldSess.Close()
	}
	return res, nil
}

// dialOptions are the options of a connection to r over TLS with conf.
func (r replica) dialOptions(conf *tls.Config, extra ...grpc.DialOption) []grpc.DialOption {
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(conf))}, extra...)
	if r.authority != r.addr {
		opts = append(opts, grpc.WithAuthority(r.authority))
	}
	return opts
}

// agentSVIDFrom checks the SVID the signer issued: it must be for the key
// the TPM holds, and verify against the bundle.
func (u *signerConn) agentSVIDFrom(res *signerpb.AttestResult, sess *node.Session) (*x509svid.SVID, error) {
	chain, err := parseCerts("agent SVID", res.GetSvid())
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(chain[0].PublicKey, sess.Signer().Public()) {
		return nil, errors.New("agent SVID is not for the TPM key")
	}
	cas, err := parseCerts("bundle", res.GetBundle().GetX509Authorities())
	if err != nil {
		return nil, err
	}
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(u.signerID.TrustDomain(), cas))
	if err != nil {
		return nil, fmt.Errorf("agent SVID does not verify against the signer's bundle: %w", err)
	}
	if !strings.HasPrefix(id.Path(), agentPathPrefix) {
		return nil, fmt.Errorf("signer issued %s, not an agent SVID", id)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: sess.Signer()}, nil
}

// agentPathPrefix starts the path of every agent SVID; the EK hash
// follows it.
const agentPathPrefix = "/lanyard/agent/tpm/"

// signX509SVIDs asks the signer to sign CSRs on the mTLS connection.
func (u *signerConn) signX509SVIDs(ctx context.Context, req *signerpb.SignX509SVIDsRequest) (*signerpb.SignX509SVIDsResponse, error) {
	client, _ := u.client()
	if client == nil {
		return nil, errNotConnected
	}
	return client.SignX509SVIDs(ctx, req)
}

// mintJWTSVIDs asks the signer for JWT-SVIDs on the mTLS connection.
func (u *signerConn) mintJWTSVIDs(ctx context.Context, reqs []*signerpb.JWTSVIDRequest) ([]*signerpb.MintedJWTSVID, error) {
	client, _ := u.client()
	if client == nil {
		return nil, errNotConnected
	}
	ctx, cancel := context.WithTimeout(ctx, mintTimeout)
	defer cancel()
	resp, err := client.MintJWTSVIDs(ctx, &signerpb.MintJWTSVIDsRequest{Requests: reqs})
	if err != nil {
		return nil, fmt.Errorf("mint %d JWT-SVIDs: %w", len(reqs), err)
	}
	return resp.GetSvids(), nil
}

// sync opens the sync stream on the current connection, waiting up to
// syncConnectWait for the connection to be ready. replaced is closed once
// that connection is replaced; err is errNotConnected before the first
// attestation.
func (u *signerConn) sync(ctx context.Context) (recv func() (*signerpb.SyncResponse, error), replaced <-chan struct{}, err error) {
	client, replaced := u.client()
	if client == nil {
		return nil, replaced, errNotConnected
	}
	stream, err := u.openSync(ctx, client)
	if err != nil {
		return nil, replaced, err
	}
	return stream.Recv, replaced, nil
}

// openSync opens the sync stream on client, waiting up to
// syncConnectWait for the connection to be ready.
func (u *signerConn) openSync(ctx context.Context, client signerpb.SignerClient) (grpc.ServerStreamingClient[signerpb.SyncResponse], error) {
	ctx, cancel := context.WithCancel(ctx)
	// The stream's context: cancelled by the timer only if the stream
	// is not open by then, else when the stream ends (the stream owns
	// it from here; AfterFunc's Stop reports which).
	timer := time.AfterFunc(syncConnectWait, cancel)
	stream, err := client.Sync(ctx, &signerpb.SyncRequest{}, grpc.WaitForReady(true))
	if !timer.Stop() {
		cancel()
		u.mu.Lock()
		addr := u.addr
		u.mu.Unlock()
		return nil, fmt.Errorf("signer %s: %w within %v: %w", addr, errNoConnection, syncConnectWait, cmp.Or(err, ctx.Err()))
	}
	if err != nil {
		cancel()
		return nil, err
	}
	return cancelOnEnd{stream, cancel}, nil
}

// cancelOnEnd releases the stream's context when Recv ends the stream.
type cancelOnEnd struct {
	grpc.ServerStreamingClient[signerpb.SyncResponse]
	cancel context.CancelFunc
}

func (s cancelOnEnd) Recv() (*signerpb.SyncResponse, error) {
	m, err := s.ServerStreamingClient.Recv()
	if err != nil {
		s.cancel()
	}
	return m, err
}

// resetBackoff makes the connection to the signer, if it is waiting out
// gRPC's reconnect backoff, try again now: the caller has reason to think
// the signer is back.
func (u *signerConn) resetBackoff() {
	u.mu.Lock()
	conn := u.conn
	u.mu.Unlock()
	if conn != nil {
		conn.ResetConnectBackoff()
	}
}

// becameReady returns a channel closed when the current connection to the
// signer, down now, comes up, until ctx ends; nil when there is no
// connection or it is up (a call that failed on a live connection was
// refused, and a reconnect would not change that).
func (u *signerConn) becameReady(ctx context.Context) <-chan struct{} {
	u.mu.Lock()
	conn := u.conn
	u.mu.Unlock()
	if conn == nil {
		return nil
	}
	s := conn.GetState()
	if s == connectivity.Ready {
		return nil
	}
	conn.Connect() // an idle connection does not redial by itself
	up := make(chan struct{})
	go func() {
		for conn.WaitForStateChange(ctx, s) {
			switch s = conn.GetState(); s {
			case connectivity.Ready:
				close(up)
				return
			case connectivity.Shutdown:
				return
			}
		}
	}()
	return up
}

func (u *signerConn) close() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.conn != nil {
		u.conn.Close()
		u.conn = nil
	}
	if u.sess != nil {
		u.sess.Close()
		u.sess = nil
	}
}

// publicKeysEqual compares two public keys of the kinds Go's crypto
// packages produce.
func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}

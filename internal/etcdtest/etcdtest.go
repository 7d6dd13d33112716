// Package etcdtest runs a real etcd cluster for tests: members of
// go.etcd.io/etcd/server/v3/embed in the test process, on loopback ports,
// with real Raft between them. Nothing here is a fake: a killed member
// stops answering, a killed leader forces an election.
//
// Clients reach each member through a loopback TCP relay of the test's
// own: embed's Close waits seconds for open client connections, during
// which a "killed" member would go on answering them, whereas a crashed
// host's connections die at once. Kill closes the relay and every
// connection through it first, as a crash would, then stops the member.
package etcdtest

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testport"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
)

// startTimeout bounds how long a cluster (or a restarted member) may take
// to elect a leader and serve.
const startTimeout = 30 * time.Second

// Cluster is a running embedded etcd cluster. Its methods are safe for
// concurrent use.
type Cluster struct {
	t       testing.TB
	mu      sync.Mutex
	members []*member
	initial string    // name=peerURL,... of every member
	tls     *TLSFiles // client TLS; nil for plain http
}

// TLSFiles make the members serve clients over TLS and require a client
// certificate signed by TrustedCAFile, as a production etcd does.
type TLSFiles struct {
	CertFile, KeyFile string // the members' server certificate (for 127.0.0.1)
	TrustedCAFile     string // verifies the clients' certificates
}

type member struct {
	name    string
	dir     string
	peer    url.URL
	cli     url.URL     // the relay clients use
	backend url.URL     // the member's own client listener
	etcd    *embed.Etcd // nil while killed
	relay   *relay      // nil while killed
	logPath string
	stopped sync.WaitGroup // embed shutdowns in flight
}

// Start starts an n-member cluster and waits until it serves; the test's
// cleanup stops it.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	return start(t, n, nil)
}

// StartTLS is Start with client TLS: endpoints are https://, and a client
// needs a certificate tls.TrustedCAFile signed.
func StartTLS(t testing.TB, n int, tls TLSFiles) *Cluster {
	t.Helper()
	return start(t, n, &tls)
}

func start(t testing.TB, n int, tls *TLSFiles) *Cluster {
	t.Helper()
	c := &Cluster{t: t, tls: tls}
	base := t.TempDir()
	var initial []string
	for i := range n {
		m := &member{
			name: fmt.Sprintf("m%d", i),
			dir:  filepath.Join(base, fmt.Sprintf("m%d", i)),
			peer: loopbackURL(t), cli: loopbackURL(t), backend: loopbackURL(t),
		}
		if tls != nil {
			m.cli.Scheme, m.backend.Scheme = "https", "https"
		}
		m.logPath = filepath.Join(base, m.name+".log")
		initial = append(initial, m.name+"="+m.peer.String())
		c.members = append(c.members, m)
	}
	c.initial = strings.Join(initial, ",")
	errs := make(chan error, n)
	for _, m := range c.members {
		go func() { errs <- c.start(m, "new") }()
	}
	for range n {
		if err := <-errs; err != nil {
			c.Close()
			t.Fatalf("etcdtest: %v", err)
		}
	}
	t.Cleanup(c.Close)
	return c
}

// loopbackURL reserves a loopback port a restarted member can bind again.
func loopbackURL(t testing.TB) url.URL {
	return url.URL{Scheme: "http", Host: testport.Free(t)}
}

// start starts m with the given initial cluster state ("new" the first
// time, "existing" on a restart, which reuses m's data dir).
func (c *Cluster) start(m *member, state string) error {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{m.peer}, []url.URL{m.peer}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{m.backend}, []url.URL{m.cli}
	cfg.InitialCluster = c.initial
	cfg.ClusterState = state
	cfg.InitialClusterToken = "lanyard-etcdtest"
	if c.tls != nil {
		cfg.ClientTLSInfo = transport.TLSInfo{CertFile: c.tls.CertFile, KeyFile: c.tls.KeyFile,
			TrustedCAFile: c.tls.TrustedCAFile, ClientCertAuth: true}
	}
	// Short Raft timings: a killed leader is replaced within about a
	// second, as the tier's tests expect of a production cluster.
	cfg.TickMs = 50
	cfg.ElectionMs = 500
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{m.logPath}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start member %s: %w", m.name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("member %s: %w", m.name, err)
	case <-time.After(startTimeout):
		e.Server.Stop()
		e.Close()
		return fmt.Errorf("member %s not ready within %s (log: %s)", m.name, startTimeout, m.logPath)
	}
	r, err := startRelay(m.cli.Host, m.backend.Host)
	if err != nil {
		e.Server.HardStop()
		e.Close()
		return fmt.Errorf("member %s: %w", m.name, err)
	}
	c.mu.Lock()
	m.etcd, m.relay = e, r
	c.mu.Unlock()
	return nil
}

// Endpoints are the members' client URLs, killed members included (a
// client skips those it cannot reach).
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.members))
	for i, m := range c.members {
		out[i] = m.cli.String()
	}
	return out
}

// Endpoint is member i's client URL.
func (c *Cluster) Endpoint(i int) string { return c.members[i].cli.String() }

// Leader is the index of the member that is leader now, or -1 while
// there is none (an election in progress, or no quorum).
func (c *Cluster) Leader() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, m := range c.members {
		if m.etcd == nil {
			continue
		}
		s := m.etcd.Server
		if s.Leader() != 0 && s.Leader() == s.MemberID() {
			return i
		}
	}
	return -1
}

// WaitLeader waits until a member is leader and returns its index.
func (c *Cluster) WaitLeader() int {
	c.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		if i := c.Leader(); i >= 0 {
			return i
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("etcdtest: no leader within %s", startTimeout)
	return -1
}

// Kill stops member i at once, as a crash would (its data dir stays, for
// Restart). Killing a killed member does nothing.
func (c *Cluster) Kill(i int) {
	m := c.members[i]
	c.mu.Lock()
	e, r := m.etcd, m.relay
	m.etcd, m.relay = nil, nil
	c.mu.Unlock()
	if e == nil {
		return
	}
	r.close()
	e.Server.HardStop()
	// Close waits for connections the relay no longer carries; the
	// member is already gone for its peers and clients.
	m.stopped.Add(1)
	go func() {
		defer m.stopped.Done()
		e.Close()
	}()
}

// Restart starts a killed member again with its data and ports.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	m := c.members[i]
	c.mu.Lock()
	running := m.etcd != nil
	c.mu.Unlock()
	if running {
		return
	}
	m.stopped.Wait() // the data dir is free once the last run closed
	if err := c.start(m, "existing"); err != nil {
		c.t.Fatalf("etcdtest: %v", err)
	}
}

// Close stops every member.
func (c *Cluster) Close() {
	for i, m := range c.members {
		c.Kill(i)
		m.stopped.Wait()
	}
}

// relay forwards loopback TCP connections to a member's client port
// until closed; close cuts every connection at once.
type relay struct {
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]bool
	done  bool
}

func startRelay(listen, backend string) (*relay, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("relay on %s: %w", listen, err)
	}
	r := &relay{ln: ln, conns: make(map[net.Conn]bool)}
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			go r.forward(in, backend)
		}
	}()
	return r, nil
}

func (r *relay) track(cs ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return false
	}
	for _, c := range cs {
		r.conns[c] = true
	}
	return true
}

func (r *relay) forward(in net.Conn, backend string) {
	out, err := net.DialTimeout("tcp", backend, 5*time.Second)
	if err != nil {
		in.Close()
		return
	}
	if !r.track(in, out) {
		in.Close()
		out.Close()
		return
	}
	copyClose := func(dst, src net.Conn) {
		io.Copy(dst, src)
		dst.Close()
		src.Close()
	}
	go copyClose(out, in)
	copyClose(in, out)
	r.mu.Lock()
	delete(r.conns, in)
	delete(r.conns, out)
	r.mu.Unlock()
}

func (r *relay) close() {
	r.mu.Lock()
	r.done = true
	conns := r.conns
	r.conns = nil
	r.mu.Unlock()
	r.ln.Close()
	for c := range conns {
		c.Close()
	}
}

// Log is member i's log so far (errors only), for a failing test's message.
func (c *Cluster) Log(i int) string {
	b, _ := os.ReadFile(c.members[i].logPath)
	return string(b)
}

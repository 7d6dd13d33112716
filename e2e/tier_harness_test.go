package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/etcdtest"
	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// The signer tier, end to end: a real etcd cluster (three embedded
// members in this process), replicas that are real lanyard-signer
// processes each with its own swtpm and state_dir, and agents that are
// real lanyard-agent processes given every replica's address.

// tierPrefix is the etcd prefix every replica of a test's tier shares
// (each test has its own etcd cluster).
const tierPrefix = "/lanyard/example.org"

// tierPublishLead is the replicas' ca_publish_lead: a joining replica
// publishes its CA this long before it signs anything. Short, so a join
// fits in a test; long enough that a CA that reached the agents "first"
// did so by design, not by luck.
const tierPublishLead = "3s"

// failoverBound is the tier's promise, asserted: an agent that loses its
// replica is synced to another within it, a policy applied or a node
// revoked through one replica reaches an agent synced to another within
// it. Each test logs the figure it measured.
const failoverBound = time.Second

// tier is one trust domain served by several replicas sharing etcd.
type tier struct {
	dir      string
	etcd     *etcdtest.Cluster
	policy   string // the seed policy file every replica names
	replicas []*replica
}

// replica is one lanyard-signer of the tier.
type replica struct {
	name, addr                  string
	dir, cfg, bundlePath, admin string
	tpm                         *swtpmtest.TPM
	proc                        *proc
}

// tierAgent is one lanyard-agent given a list of replica addresses.
type tierAgent struct {
	dir, cfg, socket, admin string
	tpm                     *swtpmtest.TPM
	proc                    *proc
}

// tierPolicy accepts every TPM in agents (by its EK CA) and gives this
// test process one identity per name, with X.509-SVIDs of x509TTL.
func tierPolicy(agents []*swtpmtest.TPM, x509TTL string, names ...string) string {
	var cas []string
	for _, a := range agents {
		cas = append(cas, fmt.Sprintf("%q", a.EKCAPath))
	}
	p := fmt.Sprintf("node \"lab\" {\n  ek_ca = [%s]\n}\n", strings.Join(cas, ", "))
	for _, n := range names {
		p += fmt.Sprintf(`workload %q {
  spiffe_id = "spiffe://example.org/%[1]s"
  nodes     = ["lab"]
  selectors = ["unix:uid:%d"]
  x509_ttl  = %q
}
`, n, os.Getuid(), x509TTL)
	}
	return p
}

// startTier starts a 3-member etcd cluster and n replicas seeded with
// policy, and waits until every replica serves and publishes the union of
// the n CAs in its bundle file.
func startTier(t *testing.T, n int, policy string) *tier {
	t.Helper()
	tr := &tier{dir: shortDir(t), etcd: etcdtest.Start(t, 3)}
	tr.policy = filepath.Join(tr.dir, "policy.hcl")
	writeFile(t, tr.policy, policy)
	for range n {
		tr.addReplica(t)
	}
	// Started one after another would cost a publish lead each; at once,
	// they come up together.
	for _, r := range tr.replicas {
		r.start(t)
	}
	for _, r := range tr.replicas {
		r.waitServing(t)
	}
	for _, r := range tr.replicas {
		r.waitBundle(t, n)
	}
	tr.replicas[0].checkStatusShape(t)
	return tr
}

// addReplica configures one more replica (a fresh swtpm, a fresh state
// dir) without starting it.
func (tr *tier) addReplica(t *testing.T) *replica {
	t.Helper()
	i := len(tr.replicas) + 1
	d := filepath.Join(tr.dir, fmt.Sprintf("r%d", i))
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	r := &replica{
		name: fmt.Sprintf("signer-%d", i), addr: freePort(t), dir: d, tpm: swtpmtest.Start(t),
		cfg: filepath.Join(d, "signer.hcl"), bundlePath: filepath.Join(d, "bundle.pem"),
		admin: filepath.Join(d, "admin", "s.sock"),
	}
	var eps []string
	for _, ep := range tr.etcd.Endpoints() {
		eps = append(eps, fmt.Sprintf("%q", ep))
	}
	writeFile(t, r.cfg, fmt.Sprintf(`trust_domain      = "example.org"
replica_name      = %q
listen_address    = %q
policy_path       = %q
bundle_path       = "bundle.pem"
state_dir         = %q
admin_socket_path = %q
ca_publish_lead   = %q
tpm { socket = %q }
etcd {
  endpoints = [%s]
  prefix    = %q
}
`, r.name, r.addr, tr.policy, filepath.Join(d, "state"), r.admin, tierPublishLead, r.tpm.Socket,
		strings.Join(eps, ", "), tierPrefix))
	tr.replicas = append(tr.replicas, r)
	return r
}

// start runs the replica (again, after a stop: same TPM, same state).
func (r *replica) start(t *testing.T) {
	t.Helper()
	r.proc = start(t, "lanyard-signer", "run", "--config", r.cfg)
}

// waitServing waits until the replica listens for agents and answers on
// its admin socket.
func (r *replica) waitServing(t *testing.T) {
	t.Helper()
	r.proc.waitLog(t, 30*time.Second, "signer listening")
	waitFor(t, 10*time.Second, r.name+" answering its admin socket", func() bool {
		_, err := r.status()
		return err == nil
	})
}

// kill9 crashes the replica: nothing is flushed, its lease is left to
// expire.
func (r *replica) kill9(t *testing.T) {
	t.Helper()
	r.proc.cmd.Process.Kill()
	<-r.proc.done
}

// waitBundle waits until the replica's bundle file holds at least n CA
// certificates (the union of n replicas' CAs).
func (r *replica) waitBundle(t *testing.T, n int) {
	t.Helper()
	waitFor(t, 20*time.Second, fmt.Sprintf("%d CAs in %s's bundle", n, r.name), func() bool {
		return pemCerts(r.bundlePath) >= n
	})
}

// pemCerts counts the certificates in a PEM file (0 when unreadable).
func pemCerts(path string) int {
	b, _ := os.ReadFile(path)
	return bytes.Count(b, []byte("-----BEGIN CERTIFICATE-----"))
}

// addAgent configures and starts an agent on tpm that knows the given
// replicas, trusting a copy of the first one's bundle file (what an
// operator copies once to a new host), and waits until it is ready.
func (tr *tier) addAgent(t *testing.T, tpm *swtpmtest.TPM, replicas ...*replica) *tierAgent {
	t.Helper()
	b, err := os.ReadFile(replicas[0].bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	return tr.startAgent(t, tpm, b, replicas)
}

// addAgentTrusting is addAgent with the given CAs as its trust bundle.
func (tr *tier) addAgentTrusting(t *testing.T, tpm *swtpmtest.TPM, cas []*x509.Certificate, replicas ...*replica) *tierAgent {
	t.Helper()
	var b []byte
	for _, c := range cas {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return tr.startAgent(t, tpm, b, replicas)
}

func (tr *tier) startAgent(t *testing.T, tpm *swtpmtest.TPM, bundle []byte, replicas []*replica) *tierAgent {
	t.Helper()
	d := shortDir(t)
	a := &tierAgent{dir: d, cfg: filepath.Join(d, "agent.hcl"), socket: filepath.Join(d, "w.sock"),
		admin: filepath.Join(d, "admin", "a.sock"), tpm: tpm}
	writeFile(t, filepath.Join(d, "bundle.pem"), string(bundle))
	var addrs []string
	for _, r := range replicas {
		addrs = append(addrs, fmt.Sprintf("%q", r.addr))
	}
	writeFile(t, a.cfg, fmt.Sprintf(`trust_domain      = "example.org"
signer_address    = [%s]
trust_bundle_path = "bundle.pem"
socket_path       = %q
admin_socket_path = %q
tpm { socket = %q }
`, strings.Join(addrs, ", "), a.socket, a.admin, tpm.Socket))
	a.proc = start(t, "lanyard-agent", "run", "--config", a.cfg)
	a.proc.waitLog(t, 30*time.Second, "agent ready")
	return a
}

// agentTierReport is the part of `lanyard-agent status --json` the tier
// tests read: which replica the agent is synced to.
type agentTierReport struct {
	Health  string   `json:"health"`
	Reasons []string `json:"reasons"`
	Signer  struct {
		Address   string     `json:"address"`
		Connected bool       `json:"connected"`
		LastSync  *time.Time `json:"last_sync"`
		Since     *time.Time `json:"since"`
	} `json:"signer"`
	Entries []struct {
		SPIFFEID string `json:"spiffe_id"`
		Serial   string `json:"serial"`
	} `json:"entries"`
}

// status reads the agent's report from its admin socket.
func (a *tierAgent) status() (agentTierReport, error) {
	var r agentTierReport
	err := getJSON(a.admin, "http://agent/v1/status", &r)
	return r, err
}

// syncedTo waits until the agent is synced to one of the tier's replicas
// and returns it.
func (tr *tier) syncedTo(t *testing.T, a *tierAgent) *replica {
	t.Helper()
	var got *replica
	waitFor(t, 20*time.Second, "the agent synced to a replica", func() bool {
		r, err := a.status()
		if err != nil || !r.Signer.Connected {
			return false
		}
		got = tr.byAddr(r.Signer.Address)
		return got != nil
	})
	return got
}

// byAddr is the replica listening on addr, nil if none.
func (tr *tier) byAddr(addr string) *replica {
	for _, r := range tr.replicas {
		if r.addr == addr {
			return r
		}
	}
	return nil
}

// other is a replica of the tier that is not r.
func (tr *tier) other(r *replica) *replica {
	for _, o := range tr.replicas {
		if o != r {
			return o
		}
	}
	return nil
}

// signerTierStatus is the part of `lanyard-signer status --json` a tier
// adds, as the contract names it: top-level "replica", "etcd" {"ok",
// "error"} and "policy_revision".
type signerTierStatus struct {
	Replica string `json:"replica"`
	Etcd    struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	} `json:"etcd"`
	PolicyRevision int64 `json:"policy_revision"`
}

// status reads the replica's report from its admin socket.
func (r *replica) status() (signerTierStatus, error) {
	var s signerTierStatus
	err := getJSON(r.admin, "http://signer/v1/status", &s)
	return s, err
}

// checkStatusShape asserts the contract's field names in the replica's
// status --json.
func (r *replica) checkStatusShape(t *testing.T) {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := getJSON(r.admin, "http://signer/v1/status", &raw); err != nil {
		t.Fatalf("%s status: %v", r.name, err)
	}
	var etcd map[string]json.RawMessage
	json.Unmarshal(raw["etcd"], &etcd)
	_, hasOK := etcd["ok"]
	if raw["replica"] == nil || raw["policy_revision"] == nil || !hasOK {
		var keys []string
		for k := range raw {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		t.Errorf(`%s status --json: want top-level "replica", "etcd": {"ok", "error"} and "policy_revision" (the contract); it has %v`, r.name, keys)
	}
}

// tierNode is one row of `lanyard-signer node list --json` in a tier.
type tierNode struct {
	EKSHA256  string `json:"ek_sha256"`
	AgentID   string `json:"agent_id"`
	Connected bool   `json:"connected"`
	Replica   string `json:"replica"`
	Revoked   *struct {
		Reason string `json:"reason"`
	} `json:"revoked"`
}

// nodes runs `node list --json` through the replica.
func (r *replica) nodes(t *testing.T) []tierNode {
	t.Helper()
	out, code := signerCmd(t, "node", "list", "--json", "--config", r.cfg)
	var ns []tierNode
	if err := json.Unmarshal([]byte(out), &ns); code != 0 || err != nil {
		t.Fatalf("node list through %s: exit %d, %v:\n%s", r.name, code, err, out)
	}
	return ns
}

// getJSON GETs url over a Unix socket and decodes the JSON answer.
func getJSON(socket, url string, out any) error {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

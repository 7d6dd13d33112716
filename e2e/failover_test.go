package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/adminsock"
	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// replicaReport is the part of `lanyard-agent status --json` that says
// which signer replica the agent uses.
type replicaReport struct {
	Signer struct {
		Address     string     `json:"address"`
		Candidates  []string   `json:"candidates"`
		Connected   bool       `json:"connected"`
		LastSync    *time.Time `json:"last_sync"`
		Unreachable []struct {
			Address string `json:"address"`
			Error   string `json:"error"`
		} `json:"unreachable"`
	} `json:"signer"`
}

// TestAgentFailsOverBetweenSigners: an agent given two signers (a list in
// signer_address, a trust file holding both CAs, as a tier's shared
// bundle would) syncs with one; when that one is killed -9 the agent
// attests with the other and syncs there within a second, and a workload
// streaming SVIDs meanwhile sees no error and always holds a valid SVID.
func TestAgentFailsOverBetweenSigners(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	policy := ttlPolicy(tpm, "1h", "svc")
	envs := []*env{newEnv(t, tpm, policy), newEnv(t, tpm, policy)}
	signers := map[string]*proc{}
	var trust []byte
	for _, e := range envs {
		signers[e.signerAddr] = e.startSigner(t)
		pem, err := os.ReadFile(e.bundlePath)
		if err != nil {
			t.Fatal(err)
		}
		trust = append(trust, pem...)
	}
	e := envs[0]
	writeFile(t, filepath.Join(e.dir, "trust.pem"), string(trust))
	admin := filepath.Join(e.dir, "admin", "a.sock")
	writeFile(t, e.agentCfg, fmt.Sprintf(`trust_domain      = "example.org"
signer_address    = [%q, %q]
trust_bundle_path = "trust.pem"
socket_path       = %q
admin_socket_path = %q
tpm { socket = %q }
`, envs[0].signerAddr, envs[1].signerAddr, e.socket, admin, tpm.Socket))
	e.startAgent(t).waitLog(t, 20*time.Second, "agent ready")

	var r replicaReport
	waitFor(t, 10*time.Second, "the agent synced", func() bool {
		r = replicaStatus(t, admin)
		return r.Signer.Connected
	})
	inUse := r.Signer.Address
	if signers[inUse] == nil || len(r.Signer.Candidates) != 2 {
		t.Fatalf("status names %q in use among %v, want one of the two signers", inUse, r.Signer.Candidates)
	}

	ctx := ctxFor(t, 30*time.Second)
	w := watch(ctx, t, newSource(t, ctx, e.socket))
	streamErr := make(chan error, 1)
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(
		metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatalf("first SVID: %v", err)
	}
	go func() {
		for {
			if _, err := stream.Recv(); err != nil {
				streamErr <- err
				return
			}
		}
	}()

	killed := time.Now()
	if err := signers[inUse].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var took time.Duration
	waitFor(t, 10*time.Second, "the agent synced with the other signer", func() bool {
		r = replicaStatus(t, admin)
		if !r.Signer.Connected || r.Signer.Address == inUse || r.Signer.LastSync == nil || !r.Signer.LastSync.After(killed) {
			return false
		}
		took = r.Signer.LastSync.Sub(killed)
		return true
	})
	t.Logf("signer killed -9 to the agent synced with the other: %v", took.Round(time.Millisecond))
	if took > time.Second {
		t.Errorf("the switch took %v, want under a second", took)
	}
	if len(r.Signer.Unreachable) != 1 || r.Signer.Unreachable[0].Address != inUse {
		t.Errorf("status unreachable = %+v, want the killed signer %s", r.Signer.Unreachable, inUse)
	}
	select {
	case err := <-streamErr:
		t.Errorf("the workload's FetchX509SVID stream ended across the switch: %v", err)
	default:
	}
	if _, bad := w.snapshot(); len(bad) > 0 {
		t.Errorf("the workload went without a valid SVID: %v", bad)
	}
}

// replicaStatus reads the agent's report from its admin socket; the zero
// report when the agent does not answer.
func replicaStatus(t *testing.T, socket string) replicaReport {
	t.Helper()
	var r replicaReport
	c := adminsock.Client(socket, 5*time.Second)
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://agent/v1/status")
	if err != nil {
		return r
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&r) != nil {
		return replicaReport{}
	}
	return r
}

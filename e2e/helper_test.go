package e2e

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// helperEnv selects a helper mode of the test binary itself: tests run it
// as another uid (a copy in bin, which every user may execute) to act as a
// workload that reports exactly what the agent sent it.
const helperEnv = "LANYARD_E2E_HELPER"

// runHelper runs the helper mode named by helperEnv, if any, and exits.
func runHelper() {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	var err error
	switch mode {
	case "watch-x509":
		err = watchX509(os.Args[len(os.Args)-1])
	default:
		err = fmt.Errorf("unknown helper mode %q", mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// pushedSVID is one SVID of one FetchX509SVID response, as the helper saw
// it: the label the agent put on it and the ID its certificate proves.
type pushedSVID struct {
	Label, CertID, Serial string
}

// watchX509 opens one FetchX509SVID stream with the plain generated client
// (go-spiffe's would hide the label) and prints each response as a JSON
// array of pushedSVID, one line each, until the stream ends.
func watchX509(socket string) error {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true")
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		var out []pushedSVID
		for _, s := range resp.GetSvids() {
			certs, err := x509.ParseCertificates(s.GetX509Svid())
			if err != nil || len(certs) == 0 || len(certs[0].URIs) != 1 {
				return fmt.Errorf("bad certificate for %s: %v", s.GetSpiffeId(), err)
			}
			out = append(out, pushedSVID{Label: s.GetSpiffeId(), CertID: certs[0].URIs[0].String(), Serial: certs[0].SerialNumber.Text(16)})
		}
		if err := enc.Encode(out); err != nil {
			return err
		}
	}
}

// helperCmd returns the test binary in a helper mode, as uid/gid.
func helperCmd(t *testing.T, mode string, uid, gid uint32, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "e2e.test"), append([]string{"-test.run=^$"}, args...)...)
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	return cmd
}

// copyTestBinary puts this test binary in dir so other uids can run it.
func copyTestBinary(dir string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	b, err := os.ReadFile(self)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "e2e.test"), b, 0o755)
}

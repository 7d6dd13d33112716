package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The flood figure: one unprivileged uid tries to open 50,000
// FetchX509Bundles streams (unattested, so any user can) and holds what
// the agent grants, the attack that took an agent to 1.6 GB. The agent's
// RSS is read while they are held, and a legitimate caller of another uid
// (this process) must still get its SVID.
const (
	floodStreams = 50000
	floodConns   = 100              // the attacker spreads its streams
	floodUID     = 65534            // nobody, when this process is root
	floodTimeout = 60 * time.Second // the whole attempt, held streams included
)

// floodRow runs the flood against the agent on socket (pid) and returns
// its row.
func floodRow(socket string, pid int) (row, error) {
	self, err := os.Executable()
	if err != nil {
		return row{}, err
	}
	cmd := exec.Command(self, "flood", "--socket", socket, "--streams", fmt.Sprint(floodStreams), "--conns", fmt.Sprint(floodConns))
	who := "this uid"
	if os.Geteuid() == 0 {
		// The work directory is mktemp's 0700: let the other uid reach the
		// socket (search only; it still cannot list or read the files).
		if err := os.Chmod(filepath.Dir(socket), 0o711); err != nil {
			return row{}, err
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: floodUID, Gid: floodUID}}
		who = fmt.Sprintf("uid %d", floodUID)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return row{}, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return row{}, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return row{}, fmt.Errorf("start flood: %w", err)
	}
	defer func() {
		_ = stdin.Close()
		_ = cmd.Wait()
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		return row{}, fmt.Errorf("flood: %w", err)
	}
	rss, err := settledRSS(pid)
	if err != nil {
		return row{}, err
	}
	legit := "legitimate fetch (bench uid) OK"
	if _, err := oneShot(context.Background(), socket); err != nil {
		legit = "legitimate fetch FAILED: " + err.Error()
	}
	return singleRow(fmt.Sprintf("agent RSS under %d attempted streams from one uid", floodStreams), "MiB", 1, rss,
		fmt.Sprintf("%s, %d connections: %s; %s", who, floodConns, strings.TrimSpace(line), legit)), nil
}

// cmdFlood is the attacker's side ("lanyard-bench flood"): it opens the
// streams, prints one line of counts, and holds them until stdin closes.
func cmdFlood(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("flood", flag.ExitOnError)
	socket := fs.String("socket", "", "the agent's Workload API socket")
	streams := fs.Int("streams", floodStreams, "streams to attempt")
	conns := fs.Int("conns", floodConns, "connections to spread them over")
	fs.Parse(args)
	if _, err := raiseNoFile(uint64(*conns + 1024)); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(workloadCtx(context.Background()), floodTimeout)
	defer cancel()
	var held, refused, failed atomic.Int64
	var firstErr atomic.Value // the first unexpected error, for the row's note
	var wg sync.WaitGroup
	var ccs []*grpc.ClientConn
	defer func() {
		for _, cc := range ccs {
			_ = cc.Close()
		}
	}()
	for i := range *conns {
		cc, err := dial(*socket)
		if err != nil {
			return err
		}
		ccs = append(ccs, cc)
		n := *streams / *conns
		if i < *streams%*conns {
			n++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := workload.NewSpiffeWorkloadAPIClient(cc)
			for range n {
				if ctx.Err() != nil {
					failed.Add(1)
					continue
				}
				s, err := c.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
				if err == nil {
					_, err = s.Recv() // held open, never read again
				}
				switch status.Code(err) {
				case codes.OK:
					held.Add(1)
				case codes.ResourceExhausted:
					refused.Add(1)
				default:
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	wg.Wait()
	why := ""
	if e, ok := firstErr.Load().(string); ok {
		why = " (first: " + e + ")"
	}
	fmt.Fprintf(stdout, "%d held, %d refused (ResourceExhausted), %d failed otherwise%s\n", held.Load(), refused.Load(), failed.Load(), why)
	_, _ = io.Copy(io.Discard, stdin) // hold them until the parent is done
	return nil
}

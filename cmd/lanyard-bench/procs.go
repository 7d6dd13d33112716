package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// vmRSS returns a process's resident set size in MiB, from
// /proc/<pid>/status.
func vmRSS(pid int) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read RSS of %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				return 0, fmt.Errorf("read RSS of %d: %w", pid, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("read RSS of %d: no VmRSS line", pid)
}

// settledRSS samples RSS a few times, 100 ms apart, and returns the last:
// right after a burst, freed pages are still being returned.
func settledRSS(pid int) (float64, error) {
	var v float64
	var err error
	for range 5 {
		time.Sleep(100 * time.Millisecond)
		if v, err = vmRSS(pid); err != nil {
			return 0, err
		}
	}
	return v, nil
}

// daemon is a signer or agent the suite started; its log goes to a file in
// the work directory (these logs hold no secrets).
type daemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startDaemon(name, bin, config, logPath string) (*daemon, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	cmd := exec.Command(bin, "run", "--config", config)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); lf.Close(); close(d.done) }()
	return d, nil
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits, then SIGKILL after 10 s.
func (d *daemon) stop() {
	if d == nil || d.exited() {
		return
	}
	_ = d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// tail returns the last lines of the daemon's log, for an error message.
func (d *daemon) tail() string {
	b, _ := os.ReadFile(d.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}

var startupMS = regexp.MustCompile(`startup_ms[=":]+(\d+)`)

// reportedStartup is the agent's own "agent ready ... startup_ms" figure.
func (d *daemon) reportedStartup() (time.Duration, bool) {
	b, err := os.ReadFile(d.log)
	if err != nil {
		return 0, false
	}
	m := startupMS.FindSubmatch(b)
	if m == nil {
		return 0, false
	}
	n, _ := strconv.Atoi(string(m[1]))
	return time.Duration(n) * time.Millisecond, true
}

// waitFile waits until path exists and is not empty.
func waitFile(path string, d *daemon, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if fi, err := os.Stat(path); err == nil && fi.Size() > 0 {
			return nil
		}
		if d.exited() {
			return fmt.Errorf("%s exited; its log:\n%s", d.name, d.tail())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("no %s within %v; %s log:\n%s", filepath.Base(path), timeout, d.name, d.tail())
}

// firstSVID polls FetchX509SVID every 5 ms until it succeeds and returns
// how long after start that was.
func firstSVID(socket string, d *daemon, start time.Time, timeout time.Duration) (time.Duration, error) {
	deadline := start.Add(timeout)
	for {
		if _, err := os.Stat(socket); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := oneShot(ctx, socket)
			cancel()
			if err == nil {
				return time.Since(start), nil
			}
		}
		if d.exited() {
			return 0, fmt.Errorf("agent exited; its log:\n%s", d.tail())
		}
		if time.Now().After(deadline) {
			return 0, errors.New("no SVID within " + timeout.String() + "; agent log:\n" + d.tail())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

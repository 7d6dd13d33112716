package workload

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

const nsLastPID = "/proc/sys/kernel/ns_last_pid"

// reusePID starts path as the next process to get pid, which must be free:
// it sets ns_last_pid to pid-1 just before forking. Something else on the
// host may take the PID first; ok reports whether the decoy got it.
func reusePID(t *testing.T, pid int, path string) (decoy *exec.Cmd, ok bool) {
	t.Helper()
	if err := os.WriteFile(nsLastPID, []byte(strconv.Itoa(pid-1)), 0); err != nil {
		t.Fatalf("write ns_last_pid: %v", err)
	}
	decoy = startSleep(t, path, nil)
	return decoy, decoy.Process.Pid == pid
}

// canReusePIDs reports whether the test may steer PIDs (root, and a kernel
// with ns_last_pid).
func canReusePIDs() bool {
	if os.Geteuid() != 0 {
		return false
	}
	f, err := os.OpenFile(nsLastPID, os.O_WRONLY, 0)
	if err != nil {
		return false
	}
	_ = f.Close()
	return true
}

// TestAttestCallerExits provokes the race the re-check exists for, many
// times: the caller exits (and is reaped) before or after /proc is read,
// and where the test may steer PIDs, another process with another
// executable takes its PID before the re-check. Every attestation must
// fail with ErrCallerExited; none may return selectors.
func TestAttestCallerExits(t *testing.T) {
	sleep := sleepPath(t)
	callerExe := copyExe(t, sleep, "caller")
	steer := canReusePIDs()
	if !steer {
		t.Log("PIDs are not reused on purpose here (needs root and ns_last_pid); exits only")
	}

	tests := []struct {
		name string
		// exitBeforeRead: the caller is gone before Attest starts (it
		// exited between connect and attestation); otherwise it exits
		// between the reads and the re-check.
		exitBeforeRead bool
	}{
		{name: "exits before the reads", exitBeforeRead: true},
		{name: "exits after the reads", exitBeforeRead: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const rounds = 200
			deadline := time.Now().Add(15 * time.Second)
			reused, done := 0, 0
			for ; done < rounds && time.Now().Before(deadline); done++ {
				caller := startSleep(t, callerExe, nil)
				pid := caller.Process.Pid
				p, err := PinPID(int32(pid))
				if err != nil {
					t.Fatalf("round %d: PinPID: %v", done, err)
				}
				var decoy *exec.Cmd
				exit := func() {
					_ = caller.Process.Kill()
					_ = caller.Wait()
					if steer {
						var ok bool
						if decoy, ok = reusePID(t, pid, sleep); ok {
							reused++
						}
					}
				}
				w := newWorkload(t)
				if tc.exitBeforeRead {
					exit()
				} else {
					w.afterRead = exit
				}

				sels, err := w.Attest(context.Background(), p)
				_ = p.PIDFD.Close()
				if decoy != nil {
					_ = decoy.Process.Kill()
					_ = decoy.Wait()
				}
				if !errors.Is(err, ErrCallerExited) || sels != nil {
					t.Fatalf("round %d: Attest = %v, %v; want ErrCallerExited and no selectors", done, sels, err)
				}
			}
			t.Logf("%d rounds, PID taken by another process in %d", done, reused)
			if done < 10 {
				t.Fatalf("only %d rounds in the time allowed", done)
			}
			if steer && reused == 0 {
				t.Errorf("no round got the PID reused; the test did not provoke what it claims")
			}
		})
	}
}

// TestAttestCallerChangesUID: a caller that drops to another uid after
// connecting is refused, whatever it reads as.
func TestAttestCallerChangesUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("starting a process as uid 65534 needs root")
	}
	cmd := startSleep(t, copyExe(t, sleepPath(t), "sleep-copy"), &syscall.Credential{Uid: 65534, Gid: 65534})
	// As if it had connected as root and then called setuid(65534).
	p := Process{PID: int32(cmd.Process.Pid), UID: 0, GID: 65534}
	sels, err := newWorkload(t).Attest(context.Background(), p)
	if !errors.Is(err, ErrCallerChanged) || sels != nil {
		t.Fatalf("Attest = %v, %v; want ErrCallerChanged", sels, err)
	}
}

// BenchmarkAttestSelf measures one attestation of the test process, which
// is pinned once as the Workload API pins a connection: cold hashes the
// test binary on every call (a fresh Workload each time), warm finds the
// hash cached, unix-without-hash is the Unix type (no hash, no cgroup).
func BenchmarkAttestSelf(b *testing.B) {
	p, err := PinPID(int32(os.Getpid()))
	if err != nil {
		b.Fatal(err)
	}
	defer p.PIDFD.Close()
	// As the Workload API pins a connection: with the start time and the
	// executable (attestor.Identify), both re-checked on every call.
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	fi, err := os.Stat(exe)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("test binary: %d bytes", fi.Size())
	ctx := context.Background()
	fresh := func(b *testing.B) *Workload {
		w := newWorkload(b)
		// The test binary was just linked; cache it anyway.
		w.sources[0].(unixAttestor).hashes.settle = 0
		return w
	}

	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			if _, err := fresh(b).Attest(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("warm", func(b *testing.B) {
		w := fresh(b)
		if _, err := w.Attest(ctx, p); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := w.Attest(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkAttestStack measures the goroutine stack an attestation leaves
// behind in a goroutine that then waits, as a Workload API stream's handler
// attests its caller once and then sits idle for hours: StackInuse
// (runtime.MemStats) per goroutine once n goroutines have each attested
// this process and blocked ("stack-B/goroutine"), and again after two
// collections, which shrink stacks that use under a quarter of their size
// ("stack-B/goroutine-gc"). "shallow" blocks right after Attest;
// "under-2KiB" attests and blocks beneath 2 KiB of other frames, as a
// handler does beneath gRPC's serving frames, where shrinking helps less.
// A metric, not an assertion: StackInuse also counts the runtime's own.
func BenchmarkAttestStack(b *testing.B) {
	p, err := PinPID(int32(os.Getpid()))
	if err != nil {
		b.Fatal(err)
	}
	defer p.PIDFD.Close()
	ctx := context.Background()
	w := newWorkload(b)
	w.sources[0].(unixAttestor).hashes.settle = 0
	if _, err := w.Attest(ctx, p); err != nil {
		b.Fatal(err)
	}
	const n = 500
	for _, bc := range []struct {
		name   string
		frames int // of 256 bytes each, beneath Attest
	}{
		{name: "shallow", frames: 0},
		{name: "under-2KiB", frames: 8},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var held, heldGC float64
			rounds := 0
			for b.Loop() {
				runtime.GC()
				base := stackInuse()
				release := make(chan struct{})
				errs := make(chan error, n)
				var attested, exited sync.WaitGroup
				for range n {
					attested.Add(1)
					exited.Add(1)
					go func() {
						defer exited.Done()
						underFrames(bc.frames, func() {
							_, err := w.Attest(ctx, p)
							errs <- err
							attested.Done()
							<-release
						})
					}()
				}
				attested.Wait()
				held += float64(stackInuse()-base) / n
				runtime.GC()
				runtime.GC()
				heldGC += float64(stackInuse()-base) / n
				close(release)
				exited.Wait()
				close(errs)
				for err := range errs {
					if err != nil {
						b.Fatal(err)
					}
				}
				rounds++
			}
			b.ReportMetric(held/float64(rounds), "stack-B/goroutine")
			b.ReportMetric(heldGC/float64(rounds), "stack-B/goroutine-gc")
		})
	}
}

// stackInuse is runtime.MemStats.StackInuse as a signed number, so that a
// difference may be negative.
func stackInuse() int64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.StackInuse)
}

// underFrames runs f beneath frames stack frames of 256 bytes each: a
// stand-in for the callers a real handler runs under.
//
//go:noinline
func underFrames(frames int, f func()) byte {
	var pad [256]byte
	pad[frames%len(pad)] = byte(frames)
	if frames > 0 {
		return underFrames(frames-1, f) + pad[(frames*7)%len(pad)]
	}
	f()
	return pad[0]
}

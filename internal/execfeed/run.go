package execfeed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// forwarded are the signals exec passes to the command: those a service
// manager or an operator sends to stop or steer a program.
var forwarded = []os.Signal{syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGUSR2}

// Run starts cfg.Command once its identity is in the files, keeps the
// files current until the command exits, and returns the command's exit
// status (128+N when signal N ended it). A non-nil error is exec's own
// failure, with the exit status to use for it (Exit*).
func Run(ctx context.Context, cfg Config) (int, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return ExitUsage, err
	}
	path, err := exec.LookPath(cfg.Command[0])
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return ExitCannotRun, fmt.Errorf("command %s: %w", cfg.Command[0], err)
		}
		return ExitNotFound, fmt.Errorf("command %s: %w", cfg.Command[0], err)
	}
	// Before anything runs: a signal that comes while exec waits for the
	// identity must end exec, not kill it uncleaned.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, forwarded...)
	defer signal.Stop(sigs)

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	src := cfg.source
	if src == nil {
		client, err := workloadapi.New(ctx, workloadapi.WithAddr(cfg.Addr))
		if err != nil {
			return ExitSetup, fmt.Errorf("workload api client for %s: %w", cfg.Addr, err)
		}
		// Canceled first: a closing client must not read as a broken stream.
		defer func() { cancel(); client.Close() }()
		src = client
	}
	l, err := prepare(cfg, path)
	if err != nil {
		return ExitSetup, err
	}
	watch := newX509Watch(ctx, cfg.Log)
	wg.Go(func() { watch.run(src) })
	s := &supervisor{cfg: cfg, src: src, launch: l, watch: watch, sigs: sigs, wg: &wg, jwts: make(chan jwtResult)}
	defer func() {
		if s.child == nil {
			l.abort()
		}
		if err := l.cleanup(); err != nil {
			cfg.Log.Error("could not remove the files", "error", err)
		}
	}()
	return s.loop(ctx)
}

// supervisor is Run's state once the files have a place.
type supervisor struct {
	cfg    Config
	src    source
	launch *launch
	watch  *x509Watch
	sigs   chan os.Signal
	wg     *sync.WaitGroup

	jwts    chan jwtResult
	jwtOn   bool
	jwt     *jwtsvid.SVID
	jwtErr  error
	svid    *x509svid.SVID
	bundle  *x509bundle.Bundle
	pickErr error

	written written
	child   *exec.Cmd
	done    chan error
}

// written is what the current generation holds, to skip pushes that
// change nothing the files show.
type written struct {
	serial string
	bundle []byte
	jwt    string
}

func (s *supervisor) loop(ctx context.Context) (int, error) {
	deadline := time.NewTimer(s.cfg.Timeout)
	defer deadline.Stop()
	var grace, expiry <-chan time.Time
	for {
		select {
		case <-s.watch.changed:
			s.takeX509(ctx)
		case r := <-s.jwts:
			if r.err == nil {
				s.jwt, s.jwtErr = r.svid, nil
			} else {
				s.jwtErr = r.err
			}
		case <-deadline.C:
			return ExitNoIdentity, fmt.Errorf("no identity from the Workload API at %s within %s: %w", s.cfg.Addr, s.cfg.Timeout, s.whyNotReady())
		case sig := <-s.sigs:
			if s.child == nil {
				return 128 + int(sig.(syscall.Signal)), fmt.Errorf("%s before the command started", sig)
			}
			s.child.Process.Signal(sig)
			continue
		case err := <-s.done:
			return s.exitStatus(err)
		case <-grace:
			grace = nil
			if err := s.launch.store.Retire(); err != nil {
				s.cfg.Log.Error("could not remove a replaced generation", "error", err)
			}
			continue
		case <-expiry:
			expiry = nil
			leaf := s.svid.Certificates[0]
			s.cfg.Log.Error("x509-svid expired without renewal; the files keep it until one comes", "spiffe_id", s.svid.ID, "serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
			continue
		case <-ctx.Done():
			if s.child != nil {
				s.child.Process.Kill()
				<-s.done
			}
			return ExitSetup, ctx.Err()
		}
		if s.svid == nil || (s.jwtOn && s.jwt == nil) {
			continue
		}
		w := written{serial: s.svid.Certificates[0].SerialNumber.Text(16), bundle: bundlePEM(s.bundle)}
		if s.jwt != nil {
			w.jwt = s.jwt.Marshal()
		}
		if s.child != nil && w.serial == s.written.serial && bytes.Equal(w.bundle, s.written.bundle) && w.jwt == s.written.jwt {
			continue
		}
		if err := s.write(w); err != nil {
			if s.child == nil {
				return ExitSetup, err
			}
			s.cfg.Log.Error("could not write the new files; the command keeps the previous ones", "error", err)
			continue
		}
		expiry = time.After(time.Until(s.svid.Certificates[0].NotAfter))
		if s.child == nil {
			deadline.Stop()
			if err := s.start(); err != nil {
				return ExitCannotRun, err
			}
			continue
		}
		grace = time.After(s.cfg.Grace)
		if s.cfg.Signal != 0 {
			if err := s.child.Process.Signal(s.cfg.Signal); err != nil {
				s.cfg.Log.Warn("could not signal the command", "signal", s.cfg.Signal, "error", err)
			}
		}
		s.cfg.Log.Info("files switched", "spiffe_id", s.svid.ID, "serial", w.serial, "not_after", s.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339), "signal", signalName(s.cfg.Signal))
	}
}

// takeX509 adopts the latest pushed context if it holds a usable SVID;
// on the first, it starts the JWT-SVID fetches for that SVID's ID.
func (s *supervisor) takeX509(ctx context.Context) {
	c, _ := s.watch.get()
	svid, bundle, err := pick(c, s.cfg.ID, time.Now())
	if err != nil {
		s.pickErr = err
		if s.child != nil {
			s.cfg.Log.Warn("workload api update not used; the files keep the previous identity", "error", err)
		}
		return
	}
	s.svid, s.bundle, s.pickErr = svid, bundle, nil
	if len(s.cfg.JWTAudiences) > 0 && !s.jwtOn {
		s.jwtOn = true
		params := jwtsvid.Params{Audience: s.cfg.JWTAudiences[0], ExtraAudiences: s.cfg.JWTAudiences[1:], Subject: svid.ID}
		s.wg.Go(func() { fetchJWTs(ctx, s.src, params, s.jwts, s.cfg.Log) })
	}
}

// whyNotReady names what is missing when the timeout strikes.
func (s *supervisor) whyNotReady() error {
	if s.svid == nil {
		if _, err := s.watch.get(); err != nil {
			return err
		}
		if s.pickErr != nil {
			return s.pickErr
		}
		return errors.New("no X.509-SVID was served")
	}
	if s.jwtErr != nil {
		return fmt.Errorf("no JWT-SVID: %w", s.jwtErr)
	}
	return errors.New("no JWT-SVID was served")
}

// write renders the held identity and switches the files to it.
func (s *supervisor) write(w written) error {
	cert, key, err := s.svid.Marshal()
	if err != nil {
		return fmt.Errorf("encode the X.509-SVID of %s: %w", s.svid.ID, err)
	}
	f := Files{Cert: cert, Key: key, Bundle: w.bundle}
	if s.jwt != nil {
		f.JWT = []byte(w.jwt)
	}
	if err := s.launch.store.Switch(f); err != nil {
		return err
	}
	s.written = w
	return nil
}

// start runs the command, now that the files hold its identity.
func (s *supervisor) start() error {
	cmd, err := s.launch.start()
	if err != nil {
		return err
	}
	s.child = cmd
	s.done = make(chan error, 1)
	s.wg.Go(func() { s.done <- cmd.Wait() })
	s.cfg.Log.Info("command started", "pid", cmd.Process.Pid, "spiffe_id", s.svid.ID, "serial", s.written.serial, "files", s.launch.where)
	return nil
}

// exitStatus is the command's status as a shell reports it.
func (s *supervisor) exitStatus(err error) (int, error) {
	st, ok := s.child.ProcessState.Sys().(syscall.WaitStatus)
	if !ok {
		return ExitSetup, fmt.Errorf("wait for the command: %w", err)
	}
	if st.Signaled() {
		return 128 + int(st.Signal()), nil
	}
	return st.ExitStatus(), nil
}

func bundlePEM(b *x509bundle.Bundle) []byte {
	pem, err := b.Marshal()
	if err != nil {
		return nil // Marshal fails only for an empty bundle
	}
	return pem
}

func signalName(sig os.Signal) string {
	if sig == syscall.Signal(0) {
		return "none"
	}
	return sig.String()
}

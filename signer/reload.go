package signer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/lanyard-dev/lanyard/internal/filewatch"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/signer/policy"
)

// reloadCounters count policy reloads since start, for Stats (and the
// metrics built on it).
type reloadCounters struct {
	ok, failed atomic.Uint64
	serial     sync.Mutex // one reload at a time, so the last read wins
	mu         sync.Mutex
	lastErr    string // first problem of the last failed reload; "" after a good one
}

// Stats is a snapshot of the signer for status lines and metrics.
type Stats struct {
	Agents         int    // attested agents the signer remembers
	Nodes          int    // node blocks in the policy in force
	Workloads      int    // workload entries in the policy in force
	BundleSequence uint64 // bumped on every trust bundle change
	// PolicyReloads and PolicyReloadFailures count the policy file's
	// reloads (after an edit, or on ReloadPolicy) put in force and refused
	// since start, for metrics.
	PolicyReloads, PolicyReloadFailures uint64
	// LastReloadError is the first problem of the last refused edit, as
	// "file:line: message"; "" when the last edit was good.
	LastReloadError string
}

// Stats returns the signer's counts now.
func (s *Signer) Stats() Stats {
	s.mu.Lock()
	st := Stats{Agents: len(s.agents), Nodes: len(s.pol.Nodes), Workloads: len(s.pol.Workloads), BundleSequence: s.bundleN}
	s.mu.Unlock()
	st.PolicyReloads, st.PolicyReloadFailures = s.reloads.ok.Load(), s.reloads.failed.Load()
	s.reloads.mu.Lock()
	st.LastReloadError = s.reloads.lastErr
	s.reloads.mu.Unlock()
	return st
}

// Ready is closed once Serve has loaded the policy, published the bundle
// and accepts agents.
func (s *Signer) Ready() <-chan struct{} { return s.ready }

// watchPolicy takes every edit of policy_path into force, until ctx ends.
func (s *Signer) watchPolicy(ctx context.Context) error {
	s.mu.Lock()
	src := s.policySrc
	s.mu.Unlock()
	w := &filewatch.Watcher{Path: s.cfg.PolicyPath, Loaded: src, Log: s.log.Named("policy")}
	return w.Run(ctx, func(src []byte) { s.reloadPolicy(src) })
}

// ReloadPolicy reads policy_path again and puts it in force if valid, even
// when its content did not change (an ek_ca file it names may have):
// `systemctl reload lanyard-signer` sends SIGHUP, which calls it. On an
// invalid file the last good policy stays in force and the error, with
// every file:line problem, is logged, counted and returned.
func (s *Signer) ReloadPolicy() error {
	if s.tier != nil {
		// A replica's policy is etcd's revision; policy_path only seeded it.
		s.log.Info("policy reload ignored: a tier's policy changes with `lanyard-signer policy apply`")
		return nil
	}
	src, err := os.ReadFile(s.cfg.PolicyPath)
	if err != nil {
		s.reloads.failed.Add(1)
		s.metrics.PolicyReload(false)
		s.setReloadError(err.Error())
		s.log.Error("policy reload failed; the last good policy stays in force", "path", s.cfg.PolicyPath, "error", err)
		return fmt.Errorf("reload policy: %w", err)
	}
	return s.reloadPolicy(src)
}

func (s *Signer) setReloadError(msg string) {
	s.reloads.mu.Lock()
	s.reloads.lastErr = msg
	s.reloads.mu.Unlock()
}

// reloadPolicy validates an edited policy file and puts it in force, which
// pushes it to every connected agent. An invalid edit changes nothing: it
// is logged with every file:line problem, and the last good policy stays.
func (s *Signer) reloadPolicy(src []byte) error {
	s.reloads.serial.Lock()
	defer s.reloads.serial.Unlock()
	// The watcher never passes an empty file: that is what a reader sees
	// between an in-place truncate and write, and an empty policy would
	// take every identity away from every host.
	p, err := policy.Parse(src, s.cfg.PolicyPath, s.cfg.TrustDomain)
	if err != nil {
		n := s.reloads.failed.Add(1)
		s.metrics.PolicyReload(false)
		first := err.Error()
		var es hclconf.Errors
		if errors.As(err, &es) && len(es) > 0 {
			first = es[0].Error()
		}
		s.setReloadError(first)
		s.log.Error("policy reload failed; the last good policy stays in force", "path", s.cfg.PolicyPath, "failures", n, "error", err)
		return fmt.Errorf("reload policy: %w", err)
	}
	s.mu.Lock()
	s.policySrc = src
	s.setPolicyLocked(p)
	s.notifyLocked()
	agents := len(s.agents)
	s.mu.Unlock()
	n := s.reloads.ok.Add(1)
	s.metrics.PolicyReload(true)
	s.setReloadError("")
	s.log.Info("policy reloaded", "path", s.cfg.PolicyPath, "nodes", len(p.Nodes), "workloads", len(p.Workloads), "agents", agents, "reloads", n)
	return nil
}

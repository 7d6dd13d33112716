package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/lanyard-dev/lanyard/internal/sdnotify"
	"github.com/lanyard-dev/lanyard/signer"
)

// notifyDaemon is what systemd hears about the signer: READY=1 once it
// listens with its policy loaded and its bundle published, and a STATUS=
// line with its counts. Stats takes the signer's lock, the one every
// attestation and sync takes, so a wedged signer stops the watchdog pings.
func notifyDaemon(s *signer.Signer, addr string) sdnotify.Daemon {
	return sdnotify.Daemon{Ready: s.Ready(), Status: func() string { return tierLine(s.Tier(), statusLine(s.Stats(), addr)) }}
}

// tierLine adds a replica's state in its tier to line: joining or etcd
// trouble first, as what explains the rest.
func tierLine(t *signer.TierStatus, line string) string {
	switch {
	case t == nil:
		return line
	case !t.JoiningUntil.IsZero():
		return fmt.Sprintf("replica %s joining the tier: serves agents from %s, once every replica has pushed its CA", t.Replica, t.JoiningUntil.UTC().Format("2006-01-02T15:04:05Z"))
	case !t.EtcdOK:
		line = "etcd unavailable (serving on; policy apply and node revoke refused): " + t.EtcdError + "; " + line
	}
	return fmt.Sprintf("replica %s, policy revision %d, %d replicas alive; %s", t.Replica, t.PolicyRevision, t.ReplicasAlive, line)
}

// statusLine puts a refused policy edit first: it is the thing to fix.
func statusLine(st signer.Stats, addr string) string {
	s := fmt.Sprintf("listening on %s: %d agents, policy with %d nodes and %d workloads, bundle sequence %d",
		addr, st.Agents, st.Nodes, st.Workloads, st.BundleSequence)
	if st.LastReloadError != "" {
		s = "policy edit refused, last good policy in force: " + st.LastReloadError + "; " + s
	}
	return s
}

// reloadOnHangup re-reads the policy on every SIGHUP (`systemctl reload`)
// until ctx ends. The file watcher already takes every edit; a hang-up is
// for what it cannot see, such as a replaced ek_ca file.
func reloadOnHangup(ctx context.Context, s *signer.Signer) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-hup:
			s.ReloadPolicy() // logged and counted by the signer
		}
	}
}

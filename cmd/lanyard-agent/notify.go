package main

import (
	"cmp"
	"fmt"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/sdnotify"
)

// notifyDaemon is what systemd hears about the agent: READY=1 once it
// attested, synced, signed its first SVIDs and listens on the Workload API,
// and a STATUS= line built from the same report `lanyard-agent status`
// shows. Building that report takes the agent's locks, which is what makes
// it a fair liveness check before each watchdog ping.
func notifyDaemon(a *agent.Agent, signerAddr string) sdnotify.Daemon {
	return sdnotify.Daemon{
		Ready: a.Serving(),
		Status: func() string {
			if !isClosed(a.Running()) {
				return "starting: opening the TPM"
			}
			return statusLine(a.Report(time.Now()), isClosed(a.Serving()), signerAddr)
		},
	}
}

// statusLine says in one line what the agent is doing, worst news first.
// It names the signer replica in use (the report's), or signerAddr, the
// configured one, when the report names none. With several replicas to
// choose from, the serving line names the one in use too.
func statusLine(r agent.Report, serving bool, signerAddr string) string {
	failures := r.Signer.ConsecutiveFailures
	signerAddr = cmp.Or(r.Signer.Address, signerAddr)
	switch {
	case serving:
		s := fmt.Sprintf("%s: serving %s", r.Health, plural(len(r.Entries), "entry", "entries"))
		if len(r.Signer.Candidates) > 1 {
			s += " via signer " + signerAddr
		}
		if len(r.Reasons) > 0 {
			s += "; " + strings.Join(r.Reasons, "; ")
		}
		return s
	case r.TPM.Error != "":
		return "not serving yet: TPM unreachable, reopening it: " + r.TPM.Error
	case r.Agent.SPIFFEID == "" && failures == 0:
		return "attesting to the signer at " + signerAddr
	case r.Agent.SPIFFEID == "":
		return fmt.Sprintf("not attested: signer %s unreachable or refusing (%s), retrying", signerAddr, plural(failures, "failure", "failures"))
	}
	return "attested; syncing entries and signing first SVIDs"
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Package sdnotify speaks systemd's notify protocol for both Lanyard
// daemons: READY=1 once the daemon really serves, STATUS= lines that say
// what it is doing, WATCHDOG=1 pings from a loop that proves the daemon
// still answers, and STOPPING=1 at shutdown. Outside systemd (no
// NOTIFY_SOCKET) it does nothing.
package sdnotify

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"
)

// StatusEvery is how often the STATUS= line is recomputed (and sent when
// it changed): milestones show in `systemctl status` within this time.
const StatusEvery = time.Second

// Daemon is what the notify loop watches.
type Daemon struct {
	// Ready is closed once the daemon serves; READY=1 follows at once.
	Ready <-chan struct{}
	// Status returns the one-line STATUS= text. The loop calls it before
	// every watchdog ping, so it should take the locks the daemon's work
	// takes: a daemon wedged on them stops pinging and systemd restarts it.
	Status func() string
}

// Notifier sends notifications to the socket systemd named in
// NOTIFY_SOCKET. Create it with FromEnv.
type Notifier struct {
	enabled  bool
	watchdog time.Duration // WATCHDOG_USEC for this process; 0 when off
	log      hclog.Logger
}

// FromEnv reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID. A malformed
// watchdog setting is logged and the watchdog left off rather than ending
// the daemon: systemd then restarts it only if it really stops.
func FromEnv(log hclog.Logger) *Notifier {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	n := &Notifier{log: log}
	// Left in the environment, where go-systemd's SdNotify reads it on
	// every call: the daemons start no children that could inherit it.
	n.enabled = os.Getenv("NOTIFY_SOCKET") != ""
	wd, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("ignoring the watchdog setting", "error", err)
	}
	n.watchdog = wd
	return n
}

// Enabled reports whether systemd listens for notifications.
func (n *Notifier) Enabled() bool { return n.enabled }

// WatchdogInterval is the watchdog timeout systemd set (WatchdogSec=); 0
// when there is none. Pings go out at half of it.
func (n *Notifier) WatchdogInterval() time.Duration { return n.watchdog }

// Send sends one notification (lines such as "READY=1\nSTATUS=...").
func (n *Notifier) Send(state string) error {
	if !n.enabled {
		return nil
	}
	if _, err := daemon.SdNotify(false, state); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// Run notifies systemd about d until ctx ends: the STATUS= line whenever it
// changes, READY=1 once d.Ready is closed, WATCHDOG=1 at half the watchdog
// interval, and STOPPING=1 when ctx ends (a signal asked the daemon to
// stop). Without NOTIFY_SOCKET it returns at once.
func (n *Notifier) Run(ctx context.Context, d Daemon) error {
	if !n.enabled {
		return nil
	}
	last := d.Status()
	n.send("STATUS=" + last)
	statusT := time.NewTicker(StatusEvery)
	defer statusT.Stop()
	var ping <-chan time.Time
	if n.watchdog > 0 {
		t := time.NewTicker(n.watchdog / 2)
		defer t.Stop()
		ping = t.C
	}
	ready := d.Ready
	for {
		select {
		case <-ctx.Done():
			n.send("STOPPING=1\nSTATUS=stopping")
			return nil
		case <-ready:
			ready = nil // a closed channel would fire forever
			last = d.Status()
			n.send("READY=1\nSTATUS=" + last)
		case <-statusT.C:
			if st := d.Status(); st != last {
				last = st
				n.send("STATUS=" + st)
			}
		case <-ping:
			// Status is the liveness check: the ping goes out only once
			// it has returned.
			msg := "WATCHDOG=1"
			if st := d.Status(); st != last {
				last = st
				msg += "\nSTATUS=" + st
			}
			n.send(msg)
		}
	}
}

// send logs a failed notification instead of failing the daemon: the
// notification socket going away is systemd's problem, and a watchdog that
// misses its pings restarts the daemon anyway.
func (n *Notifier) send(state string) {
	if err := n.Send(state); err != nil {
		n.log.Warn("cannot notify systemd", "error", err)
	}
}

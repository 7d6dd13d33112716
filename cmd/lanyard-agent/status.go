package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/adminsock"
	"github.com/lanyard-dev/lanyard/internal/cli"
)

// Exit codes of status and healthcheck.
const (
	exitHealthy   = 0
	exitDegraded  = 1
	exitUnhealthy = 2 // also: agent not running or not reachable
	// exitDenied: the admin socket refused this user (it is root-only);
	// nothing is known of the agent's health. Shared by every admin command.
	exitDenied = 4
)

// adminFlags are the flags every admin-socket command takes.
type adminFlags struct {
	socket, config string
}

func (f *adminFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.socket, "admin-socket", "", "agent admin socket (default: from --config, else "+agent.DefaultAdminSocketPath+", else "+agent.SharedAdminSocketPath+")")
	fs.StringVar(&f.config, "config", "", "agent config file to read admin_socket_path from")
}

func (f *adminFlags) path() (string, error) {
	if f.socket != "" {
		return f.socket, nil
	}
	if f.config != "" {
		cfg, err := agent.LoadConfig(f.config)
		if err != nil {
			return "", err
		}
		return cfg.AdminSocketPath, nil
	}
	// Older configs keep the admin socket next to the Workload API's
	// (/run/lanyard/admin.sock): look there when the default is absent.
	if _, err := os.Stat(agent.DefaultAdminSocketPath); err != nil {
		if _, err := os.Stat(agent.SharedAdminSocketPath); err == nil {
			return agent.SharedAdminSocketPath, nil
		}
	}
	return agent.DefaultAdminSocketPath, nil
}

// adminGet fetches path from the agent's admin socket into v.
func adminGet(socket, path string, v any) error {
	resp, err := adminsock.Client(socket, 5*time.Second).Get("http://agent" + path)
	if adminsock.Refused(err) {
		return fmt.Errorf("%w (%s)", errAdminDenied, socket)
	}
	if err != nil {
		return fmt.Errorf("agent not reachable on %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// The agent's own message; the HTTP status adds nothing for a user.
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return errors.New(strings.TrimSpace(string(b)))
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// errAdminDenied is what a non-root user meets at the admin socket.
var errAdminDenied = adminsock.ErrNotRoot

// adminExit is the exit status for an adminGet error: exitDenied when the
// socket refused this user, else unreachable.
func adminExit(err error, unreachable int) int {
	if errors.Is(err, errAdminDenied) {
		return exitDenied
	}
	return unreachable
}

func healthExit(h string) int {
	switch h {
	case agent.Healthy:
		return exitHealthy
	case agent.Degraded:
		return exitDegraded
	}
	return exitUnhealthy
}

// status prints the agent's report; the exit code says its health.
func status(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af adminFlags
	af.register(fs)
	asJSON := fs.Bool("json", false, "print the report as JSON (stable field names)")
	if pos, err := cli.ParseFlags(fs, args); err != nil || len(pos) > 0 {
		if err == nil {
			fmt.Fprintf(stderr, "status: unexpected argument %q\n", pos[0])
		}
		return cli.FlagExit(err, exitUnhealthy)
	}
	socket, err := af.path()
	if err != nil {
		fmt.Fprintf(stderr, "status: %v\n", err)
		return exitUnhealthy
	}
	var r agent.Report
	if err := adminGet(socket, "/v1/status", &r); err != nil {
		if errors.Is(err, errAdminDenied) {
			fmt.Fprintf(stderr, "status: %v\n", err)
			return exitDenied
		}
		if *asJSON {
			json.NewEncoder(stdout).Encode(map[string]any{"health": agent.Unhealthy, "reasons": []string{"agent not running: " + err.Error()}})
		} else {
			fmt.Fprintf(stdout, "Health:  unhealthy: agent not running (%v)\n", err)
		}
		return exitUnhealthy
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(r)
	} else {
		printReport(stdout, r, time.Now())
	}
	return healthExit(r.Health)
}

func printReport(w io.Writer, r agent.Report, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	health := r.Health
	if len(r.Reasons) > 0 {
		health += ": " + strings.Join(r.Reasons, "; ")
	}
	fmt.Fprintf(tw, "Health:\t%s\n", health)
	if r.Agent.SPIFFEID == "" {
		fmt.Fprintf(tw, "Agent:\tnot attested\n")
	} else {
		fmt.Fprintf(tw, "Agent:\t%s, %s, renews %s\n", r.Agent.SPIFFEID, until(now, r.Agent.NotAfter, "expires"), until(now, r.Agent.RenewAt, ""))
	}
	if r.Agent.TPMManufacturer != "" || r.Agent.EKSHA256 != "" || r.TPM.Error != "" {
		tpm := fmt.Sprintf("%s, EK SHA-256 %s", orDash(r.Agent.TPMManufacturer), orDash(r.Agent.EKSHA256))
		if r.TPM.Error != "" {
			tpm += fmt.Sprintf(", UNREACHABLE %s, %s: %s", sinceStr(now, r.TPM.UnreachableSince),
				pluralS(r.TPM.ReopenFailures, "reopen attempt")+" failed", r.TPM.Error)
		}
		fmt.Fprintf(tw, "TPM:\t%s\n", tpm)
	}
	// "since" is when the stream came up or went down; the last message
	// may be much older on a quiet, healthy stream (the signer pushes only
	// changes), so it says nothing about the link by itself.
	conn := "connected"
	if !r.Signer.Connected {
		conn = "DISCONNECTED"
	}
	if r.Signer.Since != nil {
		conn += " since " + now.Sub(*r.Signer.Since).Round(time.Second).String() + " ago"
	}
	last := "never synced"
	if r.Signer.LastSync != nil {
		last = "last sync message " + now.Sub(*r.Signer.LastSync).Round(time.Second).String() + " ago"
	}
	fmt.Fprintf(tw, "Signer:\t%s, %s, %s, %d consecutive failures\n", r.Signer.Address, conn, last, r.Signer.ConsecutiveFailures)
	printReplicas(tw, r.Signer, now)
	var cas []string
	for _, ca := range r.Bundle {
		cas = append(cas, until(now, &ca.NotAfter, "expires"))
	}
	fmt.Fprintf(tw, "Bundle:\t%s: %s\n", pluralS(len(r.Bundle), "CA"), strings.Join(cas, "; "))
	fmt.Fprintf(tw, "JWT:\t%s, %s cached, %s in force\n", pluralS(len(r.JWT.KeyIDs), "signing key"),
		pluralS(r.JWT.TokensCached, "token"), pluralS(r.JWT.Revocations, "revocation"))
	printFederated(tw, r.Federated, now)
	fmt.Fprintf(tw, "Streams:\t%s\n", streams(r.OpenStreams))
	fmt.Fprintf(tw, "Uptime:\t%s, version %s\n", (time.Duration(r.UptimeSeconds) * time.Second).String(), r.Version)
	tw.Flush()

	fmt.Fprintf(w, "\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "ENTRY\tSPIFFE ID\tSERIAL\tEXPIRES\tRENEWS\n")
	for _, e := range r.Entries {
		if e.Serial == "" {
			fmt.Fprintf(tw, "%s\t%s\tNO VALID SVID\t-\t-\n", e.ID, e.SPIFFEID)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.ID, e.SPIFFEID, e.Serial, until(now, e.NotAfter, ""), until(now, e.RenewAt, ""))
	}
	if len(r.Entries) == 0 {
		fmt.Fprintf(tw, "(no entries for this node)\t\t\t\t\n")
	}
	tw.Flush()
}

// printReplicas lists the signer replicas the agent can switch to and
// those it could not reach recently, one per line; nothing with a single
// signer (its line says whether it answers). The labels stay within the
// column the other lines use.
func printReplicas(w io.Writer, s agent.SignerReport, now time.Time) {
	if len(s.Candidates) <= 1 {
		return
	}
	fmt.Fprintf(w, "Tier:\t%s: %s\n", pluralS(len(s.Candidates), "replica"), strings.Join(s.Candidates, ", "))
	for _, u := range s.Unreachable {
		fmt.Fprintf(w, "\tunreachable %s, %s ago: %s\n", u.Address, now.Sub(u.At).Round(time.Second), u.Error)
	}
}

// printFederated lists the federated bundles held, one line per trust
// domain; nothing without federation.
func printFederated(w io.Writer, fed []agent.FederatedReport, now time.Time) {
	for i, f := range fed {
		label := ""
		if i == 0 {
			label = "Federated:"
		}
		var cas []string
		for _, ca := range f.CAs {
			cas = append(cas, until(now, &ca.NotAfter, "expires"))
		}
		line := fmt.Sprintf("%s sequence %d, %s", f.TrustDomain, f.Sequence, pluralS(len(f.CAs), "CA"))
		if len(cas) > 0 {
			line += " (" + strings.Join(cas, "; ") + ")"
		}
		line += ", " + pluralS(len(f.JWTKeyIDs), "JWT key")
		fmt.Fprintf(w, "%s\t%s\n", label, line)
	}
}

// until renders a future instant relative to now, e.g. "in 29m41s".
func until(now time.Time, t *time.Time, verb string) string {
	if t == nil {
		return "-"
	}
	d := t.Sub(now).Round(time.Second)
	s := "in " + d.String()
	if d < 0 {
		s = (-d).String() + " ago"
	}
	if verb != "" {
		return verb + " " + s
	}
	return s
}

// sinceStr renders a past instant relative to now, e.g. "for 12s".
func sinceStr(now time.Time, t *time.Time) string {
	if t == nil {
		return "-"
	}
	return "for " + now.Sub(*t).Round(time.Second).String()
}

// streams renders the open Workload API streams, e.g.
// "3 open (FetchX509SVID 2, FetchX509Bundles 1)".
func streams(open map[string]int64) string {
	var total int64
	var parts []string
	for _, m := range slices.Sorted(maps.Keys(open)) {
		total += open[m]
		if open[m] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", m, open[m]))
		}
	}
	if len(parts) == 0 {
		return fmt.Sprintf("%d open", total)
	}
	return fmt.Sprintf("%d open (%s)", total, strings.Join(parts, ", "))
}

// pluralS counts n things: "1 CA", "2 CAs".
func pluralS(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return strconv.Itoa(n) + " " + thing + "s"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// healthcheck prints nothing and exits with the agent's health code.
func healthcheck(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("healthcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af adminFlags
	af.register(fs)
	if pos, err := cli.ParseFlags(fs, args); err != nil || len(pos) > 0 {
		return cli.FlagExit(err, exitUnhealthy)
	}
	socket, err := af.path()
	if err != nil {
		return exitUnhealthy
	}
	var r agent.Report
	if err := adminGet(socket, "/v1/status", &r); err != nil {
		return adminExit(err, exitUnhealthy)
	}
	return healthExit(r.Health)
}

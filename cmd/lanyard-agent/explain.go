package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/cli"
)

// Exit codes of explain.
const (
	exitMatches   = 0 // at least one entry matches the process
	exitNoMatch   = 1 // the process gets no identity
	exitNoExplain = 2 // bad usage, no such process, or agent not reachable
)

// explain asks the agent why a process does or does not get identities.
func explain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("explain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af adminFlags
	af.register(fs)
	asJSON := fs.Bool("json", false, "print the explanation as JSON (stable field names)")
	// Flags may come before or after the PID.
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return cli.FlagExit(err, exitNoExplain)
	}
	if len(pos) != 1 {
		fmt.Fprintln(stderr, "usage: lanyard-agent explain PID [--json] [--admin-socket PATH]")
		return exitNoExplain
	}
	pid, err := strconv.ParseInt(pos[0], 10, 32)
	if err != nil || pid <= 0 {
		fmt.Fprintf(stderr, "explain: %q is not a process ID\n", pos[0])
		return exitNoExplain
	}
	socket, err := af.path()
	if err != nil {
		fmt.Fprintf(stderr, "explain: %v\n", err)
		return exitNoExplain
	}
	var ex agent.Explanation
	if err := adminGet(socket, "/v1/explain?pid="+strconv.FormatInt(pid, 10), &ex); err != nil {
		fmt.Fprintf(stderr, "explain: %v\n", err)
		return adminExit(err, exitNoExplain)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(ex)
	} else {
		printExplanation(stdout, ex, time.Now())
	}
	if len(ex.Matching) == 0 {
		return exitNoMatch
	}
	return exitMatches
}

func printExplanation(w io.Writer, ex agent.Explanation, now time.Time) {
	fmt.Fprintf(w, "Process %d: uid %d, gid %d\n", ex.PID, ex.UID, ex.GID)
	switch {
	case !ex.Synced:
		fmt.Fprintln(w, "Verdict: no identity yet: the agent has not received its entries from the signer (see lanyard-agent status)")
	case len(ex.Matching) == 0:
		fmt.Fprintln(w, "Verdict: no identity: no entry of this node matches; a Workload API call gets PermissionDenied")
	default:
		ids := make([]string, len(ex.Matching))
		for i, e := range ex.Matching {
			ids[i] = e.SPIFFEID
		}
		fmt.Fprintf(w, "Verdict: gets %s\n", strings.Join(ids, ", "))
	}
	fmt.Fprintf(w, "\nSelectors (%d):\n", len(ex.Selectors))
	for _, s := range ex.Selectors {
		fmt.Fprintf(w, "  %s\n", s)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "\nMatching entries (%d):\n", len(ex.Matching))
	for _, e := range ex.Matching {
		svid := "no SVID held yet"
		if e.NotAfter != nil {
			svid = "serial " + e.Serial + ", " + until(now, e.NotAfter, "expires")
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", e.ID, e.SPIFFEID, svid)
	}
	fmt.Fprintf(tw, "\nNot matching (%d):\n", len(ex.NotMatching))
	for _, e := range ex.NotMatching {
		fmt.Fprintf(tw, "  %s\t%s\tlacks %s\n", e.ID, e.SPIFFEID, strings.Join(e.Missing, ", "))
	}
	tw.Flush()
}

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lanyard-dev/lanyard/internal/adminsock"
	"github.com/lanyard-dev/lanyard/signer"
)

// Exit codes of status and node.
const (
	exitOK          = 0
	exitFailed      = 1  // the signer refused the change (unknown node, bad reason, ...)
	exitUsage       = 2  // bad flags or arguments
	exitUnavailable = 69 // EX_UNAVAILABLE: the signer is not running or not reachable
	exitNotRoot     = 4  // the admin socket is root-only (as lanyard-agent status)
)

// errNotRoot is an admin call refused because the caller is not root.
var errNotRoot = adminsock.ErrNotRoot

// adminFlags are the flags every admin-socket command takes.
type adminFlags struct {
	socket, config string
}

func (f *adminFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.socket, "admin-socket", "", "signer admin socket (default: admin_socket_path of --config, else "+signer.DefaultAdminSocketPath+")")
	fs.StringVar(&f.config, "config", "", "signer config file to read admin_socket_path from")
}

func (f *adminFlags) path() (string, error) {
	if f.socket != "" {
		return f.socket, nil
	}
	if f.config != "" {
		cfg, err := signer.LoadConfig(f.config)
		if err != nil {
			return "", err
		}
		return cfg.AdminSocketPath, nil
	}
	return signer.DefaultAdminSocketPath, nil
}

// adminCall sends one request to the signer's admin socket and decodes
// the answer into out; a refusal comes back as the signer's error text.
func adminCall(socket, method, path string, body, out any) error {
	c := adminsock.Client(socket, 10*time.Second)
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, "http://signer"+path, rd)
	resp, err := c.Do(req)
	if err != nil {
		if adminsock.Refused(err) {
			return errNotRoot
		}
		return unavailableError{fmt.Errorf("signer not reachable on %s: %w", socket, err)}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e signer.AdminError
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = resp.Status + ": " + strings.TrimSpace(string(b))
		}
		return errors.New(e.Error)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// unavailableError is a signer that cannot be reached.
type unavailableError struct{ error }

func (e unavailableError) Unwrap() error { return e.error }

// exitFor is the exit code of an admin call's error.
func exitFor(err error) int {
	switch {
	case errors.Is(err, errNotRoot):
		return exitNotRoot
	case errors.As(err, new(unavailableError)):
		return exitUnavailable
	}
	return exitFailed
}

const nodeUsage = `usage: lanyard-signer node <command> [flags]

commands:
  list [--json]                                  every agent seen: EK SHA-256, agent SPIFFE ID,
                                                 policy nodes, TPM manufacturer, first and last
                                                 attestation, connected, agent version, revocation
  revoke (EK-SHA256 | AGENT-SPIFFE-ID) --reason TEXT
                                                 revoke a node at once: its Sync stream closes and
                                                 every call of it is refused; persisted in state_dir
  unrevoke (EK-SHA256 | AGENT-SPIFFE-ID)         lift a revocation; the agent attests again by itself

Every command takes --config FILE (to find admin_socket_path) or
--admin-socket PATH, and must run as root.

exit codes: 0 done, 1 refused by the signer, 2 usage, 69 signer not
reachable, 4 not root
`

// nodeCmd runs `lanyard-signer node ...` and returns its exit code.
func nodeCmd(args []string, stdout, stderr io.Writer) int {
	return dispatch("node", nodeUsage, args, stdout, stderr, map[string]command{
		"list":     nodeList,
		"revoke":   func(args []string, stdout, stderr io.Writer) int { return nodeChange("revoke", args, stdout, stderr) },
		"unrevoke": func(args []string, stdout, stderr io.Writer) int { return nodeChange("unrevoke", args, stdout, stderr) },
	})
}

// command is one subcommand: its arguments in, its exit code out.
type command func(args []string, stdout, stderr io.Writer) int

// dispatch runs the subcommand of group that args name: usage on stderr
// (exit 2) without one or for an unknown one, on stdout (exit 0) for help.
func dispatch(group, usage string, args []string, stdout, stderr io.Writer, cmds map[string]command) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	if c, ok := cmds[args[0]]; ok {
		return c(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "unknown %s command %q\n%s", group, args[0], usage)
	return exitUsage
}

// adminCommand parses an admin command's flags (its own added by extra)
// and finds the socket; done means exit with code now. want is how many
// positional arguments it takes.
func adminCommand(name string, args []string, stdout, stderr io.Writer, want int, extra func(*flag.FlagSet)) (socket string, pos []string, code int, done bool) {
	return adminCommandArgs(name, args, stdout, stderr, want, "(EK-SHA256 | AGENT-SPIFFE-ID)", extra)
}

// adminCommandArgs is adminCommand with the usage of its positional
// arguments.
func adminCommandArgs(name string, args []string, stdout, stderr io.Writer, want int, argUsage string, extra func(*flag.FlagSet)) (socket string, pos []string, code int, done bool) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af adminFlags
	af.register(fs)
	if extra != nil {
		extra(fs)
	}
	pos, code, done = parseFlags(fs, args, stdout)
	if done {
		return "", nil, code, true
	}
	if len(pos) != want {
		if want == 0 {
			fmt.Fprintf(stderr, "%s: unexpected argument %q\n", name, pos[0])
		} else {
			fmt.Fprintf(stderr, "usage: lanyard-signer %s %s\n", name, argUsage)
		}
		return "", nil, exitUsage, true
	}
	socket, err := af.path()
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return "", nil, exitUsage, true
	}
	return socket, pos, 0, false
}

// parseFlags parses fs from args, letting positional arguments come
// before or between the flags; --help prints usage and exits 0.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) (pos []string, code int, done bool) {
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(stdout)
				fs.Usage()
				return nil, exitOK, true
			}
			return nil, exitUsage, true
		}
		if fs.NArg() == 0 {
			return pos, 0, false
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func nodeList(args []string, stdout, stderr io.Writer) int {
	var asJSON *bool
	socket, _, code, done := adminCommand("node list", args, stdout, stderr, 0, func(fs *flag.FlagSet) {
		asJSON = fs.Bool("json", false, "print the registry as JSON (stable field names)")
	})
	if done {
		return code
	}
	var nodes []signer.NodeInfo
	if err := adminCall(socket, http.MethodGet, "/v1/nodes", nil, &nodes); err != nil {
		fmt.Fprintf(stderr, "node list: %v\n", err)
		return exitFor(err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if nodes == nil {
			nodes = []signer.NodeInfo{}
		}
		enc.Encode(nodes)
		return exitOK
	}
	printNodes(stdout, nodes, time.Now())
	return exitOK
}

func printNodes(w io.Writer, nodes []signer.NodeInfo, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "EK SHA-256\tAGENT\tNODES\tTPM\tFIRST ATTESTED\tLAST ATTESTED\tCONNECTED\tVERSION\tREVOKED\n")
	tier := slices.ContainsFunc(nodes, func(n signer.NodeInfo) bool { return n.Replica != "" })
	for _, n := range nodes {
		conn := "no"
		switch {
		case n.Connected && tier:
			conn = "yes, to " + n.Replica
		case n.Connected:
			conn = "yes"
		}
		rev := "-"
		if n.Revoked != nil {
			rev = fmt.Sprintf("%s (%s)", n.Revoked.Reason, n.Revoked.At.UTC().Format(time.RFC3339))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.EKSHA256, n.AgentID, orDash(strings.Join(n.Nodes, ",")),
			orDash(n.TPMManufacturer), n.FirstAttested.UTC().Format(time.RFC3339), n.LastAttested.UTC().Format(time.RFC3339),
			conn, orDash(n.AgentVersion), rev)
	}
	if len(nodes) == 0 {
		fmt.Fprintf(tw, "(no agent attested yet)\t\t\t\t\t\t\t\t\n")
	}
	tw.Flush()
}

func nodeChange(verb string, args []string, stdout, stderr io.Writer) int {
	var reason *string
	socket, pos, code, done := adminCommand("node "+verb, args, stdout, stderr, 1, func(fs *flag.FlagSet) {
		if verb == "revoke" {
			reason = fs.String("reason", "", "why (required; printable text): shown in node list, the audit line and the agent's status")
		}
	})
	if done {
		return code
	}
	req := signer.NodeRequest{Node: pos[0]}
	if reason != nil {
		req.Reason = *reason
	}
	var n signer.NodeInfo
	if err := adminCall(socket, http.MethodPost, "/v1/nodes/"+verb, req, &n); err != nil {
		fmt.Fprintf(stderr, "node %s: %v\n", verb, err)
		return exitFor(err)
	}
	if verb == "revoke" {
		fmt.Fprintf(stdout, "revoked %s (%s): %s\n", n.AgentID, n.EKSHA256, n.Revoked.Reason)
	} else {
		fmt.Fprintf(stdout, "unrevoked %s (%s): it attests again at its next retry\n", n.AgentID, n.EKSHA256)
	}
	return exitOK
}

// statusCmd prints the signer's health.
func statusCmd(args []string, stdout, stderr io.Writer) int {
	var asJSON *bool
	socket, _, code, done := adminCommand("status", args, stdout, stderr, 0, func(fs *flag.FlagSet) {
		asJSON = fs.Bool("json", false, "print the report as JSON (stable field names)")
	})
	if done {
		return code
	}
	var r signer.StatusReport
	if err := adminCall(socket, http.MethodGet, "/v1/status", nil, &r); err != nil {
		fmt.Fprintf(stderr, "status: %v\n", err)
		return exitFor(err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(r)
		return exitOK
	}
	now := time.Now()
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "Signer:\t%s, trust domain %s, version %s, up %s\n", r.Address, r.TrustDomain, r.Version,
		(time.Duration(r.UptimeSeconds) * time.Second).String())
	var cas []string
	for _, c := range r.CAs {
		cas = append(cas, "expires in "+c.NotAfter.Sub(now).Round(time.Second).String())
	}
	fmt.Fprintf(tw, "Bundle:\tsequence %d, %d CAs: %s\n", r.BundleSequence, len(r.CAs), strings.Join(cas, "; "))
	fmt.Fprintf(tw, "Agents:\t%d connected, %d attested, %d known\n", r.AgentsConnected, r.AgentsAttested, r.AgentsKnown)
	fmt.Fprintf(tw, "Revoked:\t%d\n", r.Revoked)
	if t := r.TierStatus; t != nil {
		etcd := "ok"
		if !t.Etcd.OK {
			etcd = fmt.Sprintf("UNAVAILABLE since %s: %s (signing and sync go on; policy apply and node revoke are refused)", t.Etcd.Since.UTC().Format(time.RFC3339), t.Etcd.Error)
		}
		fmt.Fprintf(tw, "Replica:\t%s, %d of %d replicas alive\n", t.Replica, t.ReplicasAlive, t.ReplicasKnown)
		if !t.JoiningUntil.IsZero() {
			fmt.Fprintf(tw, "Joining:\tserves agents from %s (its CA reaches every agent first)\n", t.JoiningUntil.UTC().Format(time.RFC3339))
		}
		fmt.Fprintf(tw, "etcd:\t%s\n", etcd)
		pol := fmt.Sprintf("revision %d", t.PolicyRevision)
		if t.PolicyError != "" {
			pol += "; NEWER REVISION REFUSED: " + t.PolicyError
		}
		fmt.Fprintf(tw, "Policy:\t%s\n", pol)
	}
	if b := r.BundleEndpoint; b != nil {
		line := fmt.Sprintf("%s, %s, refresh hint %s", b.ListenAddress, b.Profile, time.Duration(b.RefreshHintSeconds)*time.Second)
		if b.EndpointSPIFFEID != "" {
			line += ", endpoint SPIFFE ID " + b.EndpointSPIFFEID
		}
		fmt.Fprintf(tw, "Bundle endpoint:\t%s\n", line)
	}
	for _, f := range r.Federation {
		fmt.Fprintf(tw, "Federation %s:\t%s\n", f.TrustDomain, federationLine(f, now))
	}
	for _, w := range r.Warnings {
		fmt.Fprintf(tw, "Warning:\t%s\n", w)
	}
	tw.Flush()
	return exitOK
}

// federationLine is one federated trust domain: where from, what is
// trusted, when next, and the failure when fetches are failing now.
func federationLine(f signer.FederationStatus, now time.Time) string {
	line := fmt.Sprintf("%s (%s), ", f.URL, f.Profile)
	switch {
	case f.Trusting == "":
		line += "no bundle yet"
	case f.LastSuccess.IsZero():
		line += fmt.Sprintf("trusting the %s bundle (sequence %d, %d CAs, %d JWT keys), never fetched", f.Trusting, f.Sequence, f.CAs, f.JWTKeys)
	default:
		line += fmt.Sprintf("sequence %d (%d CAs, %d JWT keys), fetched %s ago", f.Sequence, f.CAs, f.JWTKeys, now.Sub(f.LastSuccess).Round(time.Second))
	}
	if !f.NextRefresh.IsZero() {
		line += fmt.Sprintf(", next fetch in %s", f.NextRefresh.Sub(now).Round(time.Second))
	}
	if f.LastError != "" && f.LastErrorAt.After(f.LastSuccess) {
		line += fmt.Sprintf("; FAILING (%d in a row, keeping the last good bundle): %s", f.Failures, f.LastError)
	}
	return line
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

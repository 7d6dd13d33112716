package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lanyard-dev/lanyard/signer"
	"github.com/lanyard-dev/lanyard/signer/policy"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const policyUsage = `usage: lanyard-signer policy <command> [flags]

commands:
  check [FILE] --config FILE    validate FILE (default: the config's policy_path); exit 0 when valid
  apply FILE --config FILE      validate FILE and write it to etcd as the tier's next policy
                                revision (a tier only); every replica puts it in force within a second
  show [--json] --config FILE   the policy revision in force on this replica, and its source

apply and show talk to the signer's root-only admin socket (--config FILE or
--admin-socket PATH) and must run as root.
exit codes: 0 done, 1 invalid or refused (etcd unavailable included), 2 usage,
69 signer not reachable, 4 not root
`

// policyCmd runs `lanyard-signer policy ...` and returns its exit code.
func policyCmd(args []string, stdout, stderr io.Writer) int {
	return dispatch("policy", policyUsage, args, stdout, stderr, map[string]command{
		"check": policyCheck, "apply": policyApply, "show": policyShow,
	})
}

func policyCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("policy check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	config := fs.String("config", "", "signer config file (HCL)")
	pos, code, done := parseFlags(fs, args, stdout)
	if done {
		return code
	}
	if *config == "" || len(pos) > 1 {
		fmt.Fprintln(stderr, "usage: lanyard-signer policy check [FILE] --config FILE")
		return exitUsage
	}
	cfg, err := signer.LoadConfig(*config)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailed
	}
	path := cfg.PolicyPath
	if len(pos) == 1 {
		path = pos[0]
	}
	if path == "" {
		fmt.Fprintln(stderr, "policy check: the config has no policy_path (its policy is in etcd): name the file, policy check FILE --config "+*config)
		return exitUsage
	}
	p, err := policy.Load(path, cfg.TrustDomain)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "%s: ok (%s, %s)\n", path, count(len(p.Nodes), "node block", "node blocks"), count(len(p.Workloads), "workload entry", "workload entries"))
	return exitOK
}

// policyApply validates FILE here (file:line errors, nothing sent), then
// sends it with its ek_ca files to the signer, which validates it again
// and writes it to etcd.
func policyApply(args []string, stdout, stderr io.Writer) int {
	socket, pos, code, done := adminCommandArgs("policy apply", args, stdout, stderr, 1, "FILE", nil)
	if done {
		return code
	}
	var st signer.StatusReport
	if err := adminCall(socket, http.MethodGet, "/v1/status", nil, &st); err != nil {
		fmt.Fprintf(stderr, "policy apply: %v\n", err)
		return exitFor(err)
	}
	td, err := spiffeid.TrustDomainFromString(st.TrustDomain)
	if err != nil {
		fmt.Fprintf(stderr, "policy apply: the signer reports trust domain %q: %v\n", st.TrustDomain, err)
		return exitFailed
	}
	path, err := filepath.Abs(pos[0])
	if err != nil {
		fmt.Fprintf(stderr, "policy apply: %v\n", err)
		return exitFailed
	}
	src, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "policy apply: %v\n", err)
		return exitFailed
	}
	p, err := policy.Parse(src, path, td)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailed
	}
	req := signer.PolicyApply{Filename: path, Source: string(src), Files: map[string][]byte{}}
	for _, n := range p.Nodes {
		for _, f := range n.EKCA {
			b, err := os.ReadFile(f)
			if err != nil {
				fmt.Fprintf(stderr, "policy apply: %v\n", err)
				return exitFailed
			}
			req.Files[f] = b
		}
	}
	var out signer.PolicyStatus
	if err := adminCall(socket, http.MethodPost, "/v1/policy/apply", req, &out); err != nil {
		fmt.Fprintf(stderr, "policy apply: %v\n", err)
		return exitFor(err)
	}
	fmt.Fprintf(stdout, "policy revision %d applied (%s, %s)", out.Applied, count(len(p.Nodes), "node block", "node blocks"),
		count(len(p.Workloads), "workload entry", "workload entries"))
	switch {
	case out.Error != "":
		fmt.Fprintf(stdout, "; NOT in force on this replica: %s\n", out.Error)
		return exitFailed
	case out.Revision >= out.Applied:
		fmt.Fprintf(stdout, "; in force on this replica\n")
	default:
		fmt.Fprintf(stdout, "; this replica still has revision %d in force\n", out.Revision)
	}
	return exitOK
}

func policyShow(args []string, stdout, stderr io.Writer) int {
	var asJSON *bool
	socket, _, code, done := adminCommand("policy show", args, stdout, stderr, 0, func(fs *flag.FlagSet) {
		asJSON = fs.Bool("json", false, "print as JSON (stable field names)")
	})
	if done {
		return code
	}
	var st signer.PolicyStatus
	if err := adminCall(socket, http.MethodGet, "/v1/policy", nil, &st); err != nil {
		fmt.Fprintf(stderr, "policy show: %v\n", err)
		return exitFor(err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(st)
		return exitOK
	}
	if st.Revision == 0 && st.Latest == 0 {
		fmt.Fprintf(stdout, "# policy_path %s (a lone signer: no revisions)\n", st.Filename)
	} else {
		fmt.Fprintf(stdout, "# revision %d, applied %s by %s from %s\n", st.Revision, st.AppliedAt.UTC().Format(time.RFC3339), orDash(st.AppliedBy), orDash(st.Filename))
	}
	if st.Error != "" {
		fmt.Fprintf(stdout, "# etcd holds revision %d, NOT in force here: %s\n", st.Latest, st.Error)
	}
	io.WriteString(stdout, st.Source)
	if !strings.HasSuffix(st.Source, "\n") {
		io.WriteString(stdout, "\n")
	}
	return exitOK
}

const replicaUsage = `usage: lanyard-signer replica <command> [flags]

commands:
  list [--json]     every replica of the tier: name, address, alive or down, its
                    published CAs and JWT keys and until when they stay in the bundle
  forget NAME       a replica that is down will not come back: it leaves the list once
                    its keys (kept while anything they signed may live) have expired

Every command takes --config FILE or --admin-socket PATH, and must run as root.
exit codes: 0 done, 1 refused, 2 usage, 69 signer not reachable, 4 not root
`

func replicaCmd(args []string, stdout, stderr io.Writer) int {
	return dispatch("replica", replicaUsage, args, stdout, stderr, map[string]command{
		"list": replicaList, "forget": replicaForget,
	})
}

func replicaForget(args []string, stdout, stderr io.Writer) int {
	socket, pos, code, done := adminCommandArgs("replica forget", args, stdout, stderr, 1, "NAME", nil)
	if done {
		return code
	}
	var out map[string]string
	if err := adminCall(socket, http.MethodPost, "/v1/replicas/forget", map[string]string{"name": pos[0]}, &out); err != nil {
		fmt.Fprintf(stderr, "replica forget: %v\n", err)
		return exitFor(err)
	}
	fmt.Fprintf(stdout, "replica %s forgotten: its keys stay in the bundle until they expire\n", pos[0])
	return exitOK
}

func replicaList(args []string, stdout, stderr io.Writer) int {
	var asJSON *bool
	socket, _, code, done := adminCommand("replica list", args, stdout, stderr, 0, func(fs *flag.FlagSet) {
		asJSON = fs.Bool("json", false, "print as JSON (stable field names)")
	})
	if done {
		return code
	}
	var rs []signer.ReplicaStatus
	if err := adminCall(socket, http.MethodGet, "/v1/replicas", nil, &rs); err != nil {
		fmt.Fprintf(stderr, "replica list: %v\n", err)
		return exitFor(err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rs)
		return exitOK
	}
	now := time.Now()
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "NAME\tADDRESS\tSTATE\tCAS\tJWT KEYS\tKEYS KEPT UNTIL\n")
	for _, r := range rs {
		state := "down"
		switch {
		case r.Alive:
			state = "alive"
		case r.Forgotten:
			state = "forgotten"
		}
		if r.Self {
			state += " (this replica)"
		}
		var cas, jwts []string
		for _, k := range r.Keys {
			s := k.Phase + " " + k.ID
			if k.Kind == "x509" {
				cas = append(cas, s)
			} else {
				jwts = append(jwts, s)
			}
		}
		kept := "-"
		if !r.KeptUntil.IsZero() {
			kept = fmt.Sprintf("%s (in %s)", r.KeptUntil.UTC().Format(time.RFC3339), r.KeptUntil.Sub(now).Round(time.Second))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, orDash(r.Address), state, orDash(strings.Join(cas, ", ")), orDash(strings.Join(jwts, ", ")), kept)
	}
	tw.Flush()
	return exitOK
}

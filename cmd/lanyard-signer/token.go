package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/lanyard-dev/lanyard/signer"
)

const tokenUsage = `usage: lanyard-signer token <command> [flags]

commands:
  list [--json]                          the token revocations in force: jti or SPIFFE ID,
                                         reason, when, and until when it is kept
  revoke JTI --reason TEXT               refuse one JWT-SVID (its jti claim) on every agent
  revoke --spiffe-id ID --reason TEXT    refuse every JWT-SVID of a SPIFFE ID issued until now

A revocation reaches every agent's Sync stream at once; it is kept (in
state_dir) until every token it covers has expired (now + jwt_max_ttl),
then dropped.

Every command takes --config FILE (to find admin_socket_path) or
--admin-socket PATH, and must run as root.

exit codes: 0 done, 1 refused by the signer, 2 usage, 69 signer not
reachable, 4 not root
`

// tokenCmd runs `lanyard-signer token ...` and returns its exit code.
func tokenCmd(args []string, stdout, stderr io.Writer) int {
	return dispatch("token", tokenUsage, args, stdout, stderr, map[string]command{
		"list":   tokenList,
		"revoke": tokenRevoke,
	})
}

func tokenRevoke(args []string, stdout, stderr io.Writer) int {
	var reason, id *string
	register := func(fs *flag.FlagSet) {
		reason = fs.String("reason", "", "why (required; printable text): sent to every agent and shown when the token is refused")
		id = fs.String("spiffe-id", "", "revoke every token of this SPIFFE ID issued until now, instead of one JTI")
	}
	// The positional JTI is there unless --spiffe-id is: look first.
	probe := flag.NewFlagSet("token revoke", flag.ContinueOnError)
	probe.SetOutput(io.Discard)
	var af adminFlags
	af.register(probe)
	register(probe)
	want := 1
	if _, _, done := parseFlags(probe, args, io.Discard); !done && *id != "" {
		want = 0
	}
	socket, pos, code, done := adminCommandArgs("token revoke", args, stdout, stderr, want, "(JTI | --spiffe-id ID) --reason TEXT", register)
	if done {
		return code
	}
	req := signer.TokenRevokeRequest{SPIFFEID: *id, Reason: *reason}
	if len(pos) == 1 {
		req.JTI = pos[0]
	}
	var r signer.TokenRevocation
	if err := adminCall(socket, http.MethodPost, "/v1/tokens/revoke", req, &r); err != nil {
		fmt.Fprintf(stderr, "token revoke: %v\n", err)
		return exitFor(err)
	}
	fmt.Fprintf(stdout, "revoked %s: %s (kept until %s)\n", revokedWhat(r), r.Reason, r.ExpiresAt.UTC().Format(time.RFC3339))
	return exitOK
}

// revokedWhat names what a revocation covers.
func revokedWhat(r signer.TokenRevocation) string {
	if r.JTI != "" {
		return "token " + r.JTI
	}
	return fmt.Sprintf("every token of %s issued before %s", r.SPIFFEID, r.IssuedBefore.UTC().Format(time.RFC3339))
}

func tokenList(args []string, stdout, stderr io.Writer) int {
	var asJSON *bool
	socket, _, code, done := adminCommandArgs("token list", args, stdout, stderr, 0, "", func(fs *flag.FlagSet) {
		asJSON = fs.Bool("json", false, "print the revocations as JSON (stable field names)")
	})
	if done {
		return code
	}
	var revs []signer.TokenRevocation
	if err := adminCall(socket, http.MethodGet, "/v1/tokens", nil, &revs); err != nil {
		fmt.Fprintf(stderr, "token list: %v\n", err)
		return exitFor(err)
	}
	if *asJSON {
		if revs == nil {
			revs = []signer.TokenRevocation{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(revs)
		return exitOK
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "REVOKED\tREASON\tAT\tKEPT UNTIL\n")
	for _, r := range revs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", revokedWhat(r), r.Reason, r.At.UTC().Format(time.RFC3339), r.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if len(revs) == 0 {
		fmt.Fprintf(tw, "(no token revoked)\t\t\t\n")
	}
	tw.Flush()
	return exitOK
}

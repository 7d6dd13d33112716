package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/internal/cli"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	grpcstatus "google.golang.org/grpc/status"
)

// audiences collects repeated --audience flags.
type audiences []string

func (a *audiences) String() string { return strings.Join(*a, ",") }

func (a *audiences) Set(v string) error {
	if v == "" {
		return fmt.Errorf("audience must not be empty")
	}
	*a = append(*a, v)
	return nil
}

// fetchJWT fetches JWT-SVIDs for this process with go-spiffe's client and
// prints, per SVID, its SPIFFE ID, audience, expiry and the token: handing
// the token over is the command's purpose, so stdout is the one place it
// goes.
func fetchJWT(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fetch jwt", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var aud audiences
	fs.Var(&aud, "audience", "audience the token is for (required; repeat for several)")
	rawID := fs.String("spiffe-id", "", "fetch only the JWT-SVID for this SPIFFE ID (default: every identity this process has); with --action, the entry ID the action is under")
	action := fs.String("action", "", "fetch a single-use action identity <entry ID>/action/NAME (one --audience; the entry's policy must allow NAME)")
	socket := fs.String("socket", "", "Workload API socket (default $SPIFFE_ENDPOINT_SOCKET or "+defaultSocket+")")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	tokenOnly := fs.Bool("token-only", false, "print only the token(s), one per line, for scripts")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return cli.FlagExit(err, 2)
	}
	if len(aud) == 0 || len(pos) > 0 || (*action != "" && len(aud) != 1) {
		fmt.Fprintln(stderr, "usage: lanyard-agent fetch jwt --audience A [--audience B] [--spiffe-id ID] [--socket PATH] [--timeout D] [--token-only]\n"+
			"       lanyard-agent fetch jwt --action NAME --audience A [--spiffe-id ENTRY-ID] [--socket PATH] [--timeout D] [--token-only]")
		return 2
	}
	params := jwtsvid.Params{Audience: aud[0], ExtraAudiences: aud[1:]}
	if *rawID != "" {
		id, err := spiffeid.FromString(*rawID)
		if err != nil {
			fmt.Fprintf(stderr, "fetch jwt: --spiffe-id %q: %v\n", *rawID, err)
			return 2
		}
		params.Subject = id
	}
	addr := socketAddr(*socket)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		fmt.Fprintf(stderr, "fetch jwt from %s: %v\n", addr, err)
		return 1
	}
	defer client.Close()
	if *action != "" {
		id, err := actionID(ctx, client, params.Subject, *action)
		if err != nil {
			fmt.Fprintf(stderr, "fetch jwt --action from %s: %s\n", addr, reason(err))
			return 1
		}
		params.Subject = id
	}
	svids, err := client.FetchJWTSVIDs(ctx, params)
	if err != nil {
		fmt.Fprintf(stderr, "fetch jwt from %s: %s\n", addr, reason(err))
		return 1
	}
	now := time.Now()
	for _, s := range svids {
		if *tokenOnly {
			fmt.Fprintln(stdout, s.Marshal())
			continue
		}
		fmt.Fprintf(stdout, "SPIFFE ID:  %s\n", s.ID)
		if s.Hint != "" {
			fmt.Fprintf(stdout, "  hint:       %s\n", s.Hint)
		}
		fmt.Fprintf(stdout, "  audience:   %s\n", strings.Join(s.Audience, ", "))
		fmt.Fprintf(stdout, "  expires:    %s (in %s)\n", s.Expiry.UTC().Format(time.RFC3339), s.Expiry.Sub(now).Round(time.Second))
		fmt.Fprintf(stdout, "  token:      %s\n", s.Marshal())
	}
	return 0
}

// actionID is the action identity "<parent>/action/<name>": parent is
// --spiffe-id's entry ID, or else this process's only identity (read from
// its X.509-SVIDs, which are one per entry it matches).
func actionID(ctx context.Context, client *workloadapi.Client, parent spiffeid.ID, name string) (spiffeid.ID, error) {
	if parent.IsZero() {
		svids, err := client.FetchX509SVIDs(ctx)
		if err != nil {
			return spiffeid.ID{}, fmt.Errorf("find this process's identity: %w", err)
		}
		if len(svids) != 1 {
			ids := make([]string, 0, len(svids))
			for _, s := range svids {
				ids = append(ids, s.ID.String())
			}
			return spiffeid.ID{}, fmt.Errorf("this process has %d identities (%s): name the one the action is under with --spiffe-id", len(svids), strings.Join(ids, ", "))
		}
		parent = svids[0].ID
	}
	id, err := parent.AppendPath("/action/" + name)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("action %q: not a valid path below %s: %w", name, parent, err)
	}
	return id, nil
}

// validateJWT asks the agent to validate a JWT-SVID for an audience and
// prints its SPIFFE ID and claims; on a refusal it prints the agent's
// reason and exits 1. TOKEN "-" is read from stdin, so that it stays out of
// the process list.
func validateJWT(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("validate jwt", flag.ContinueOnError)
	fs.SetOutput(stderr)
	audience := fs.String("audience", "", "audience the token must be for (required)")
	socket := fs.String("socket", "", "Workload API socket (default $SPIFFE_ENDPOINT_SOCKET or "+defaultSocket+")")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return cli.FlagExit(err, 2)
	}
	if *audience == "" || len(pos) != 1 {
		fmt.Fprintln(stderr, "usage: lanyard-agent validate jwt --audience A [--socket PATH] [--timeout D] TOKEN|-")
		return 2
	}
	token := pos[0]
	if token == "-" {
		line, err := bufio.NewReader(io.LimitReader(stdin, 1<<20)).ReadString('\n')
		if err != nil && err != io.EOF {
			fmt.Fprintf(stderr, "validate jwt: read token from stdin: %v\n", err)
			return 1
		}
		token = strings.TrimSpace(line)
	}
	addr := socketAddr(*socket)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		fmt.Fprintf(stderr, "validate jwt with %s: %v\n", addr, err)
		return 1
	}
	defer client.Close()
	svid, err := client.ValidateJWTSVID(ctx, token, *audience)
	if err != nil {
		fmt.Fprintf(stderr, "token refused: %s\n", reason(err))
		return 1
	}
	claims, err := json.MarshalIndent(svid.Claims, "  ", "  ")
	if err != nil {
		fmt.Fprintf(stderr, "validate jwt: print claims: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "SPIFFE ID:  %s\n", svid.ID)
	fmt.Fprintf(stdout, "  expires:    %s\n", svid.Expiry.UTC().Format(time.RFC3339))
	fmt.Fprintf(stdout, "  claims:     %s\n", claims)
	return 0
}

// reason renders a Workload API error as "Code: message", the server's own
// words; other errors as they are.
func reason(err error) string {
	if st, ok := grpcstatus.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

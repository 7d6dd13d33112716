package doccheck

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
)

// external are quoted fragments that come from outside Lanyard's code: the
// kernel, Go's standard library, systemd, or an example value. Each is what
// a user sees verbatim, so the table may quote it.
var external = map[string]bool{
	"connection refused": true, // the kernel
	"x509":               true, // crypto/x509's prefix
	"certificate signed by unknown authority": true, // crypto/x509
	"permission denied":                       true, // the kernel
	"read-only file system":                   true, // the kernel
	"Watchdog timeout":                        true, // systemd
	"status=78":                               true, // systemd
	"address already in use":                  true, // the kernel
	"policy.hcl:12":                           true, // an example location
	"leeway 30s":                              true, // "(leeway %s)" with JWTLeeway
	"open TPM:":                               true, // followed by the kernel's error
	"systemctl start lanyard-agent":           true, // a command, not a message
	"validate jwt":                            true, // a command
	"fetch x509":                              true,
	"fetch jwt":                               true,
	"explain":                                 true,
	"lanyard-signer policy check":             true,
	"lanyard-signer node revoke":              true,
	"lanyard-agent run":                       true,
	"lanyard-signer run":                      true,
	"tpm info":                                true,
	"/ready":                                  true, // an endpoint
	"HS256":                                   true, // an example algorithm
	`lanyard_agent_svid_failures_total{reason="refused"}`: true, // a metric, checked below by name
}

// grpcCodes prefix a message as the CLI prints a gRPC status.
var grpcCodes = regexp.MustCompile(`^(Unavailable|PermissionDenied|InvalidArgument|ResourceExhausted|token refused: InvalidArgument): `)

// TestTroubleshootingQuotesRealMessages: each backquoted fragment in the
// symptom column of README's troubleshooting table (split at "...", which
// marks what varies) appears in the source of the binaries.
func TestTroubleshootingQuotesRealMessages(t *testing.T) {
	root, err := swtpmtest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	source := sourceText(t, root)
	table := section(string(readme), "## Troubleshooting")
	if table == "" {
		t.Fatal("README has no Troubleshooting section")
	}
	quoted := regexp.MustCompile("`([^`]+)`")
	checked := 0
	for line := range strings.Lines(table) {
		if !strings.HasPrefix(line, "| ") || strings.HasPrefix(line, "| symptom") || strings.HasPrefix(line, "| ---") {
			continue
		}
		symptom := strings.SplitN(line, " | ", 2)[0]
		for _, m := range quoted.FindAllStringSubmatch(symptom, -1) {
			q := m[1]
			if external[q] {
				continue
			}
			q = grpcCodes.ReplaceAllString(q, "")
			// Messages are built from parts (%q values, wrapped errors
			// joined by ": "): each literal part must be in the source.
			for _, frag := range literalParts(q) {
				if len(frag) < 4 || external[frag] {
					continue
				}
				checked++
				if !strings.Contains(source, frag) {
					t.Errorf("README troubleshooting quotes %q, which no Go source prints (row: %s)", frag, strings.TrimSpace(symptom))
				}
			}
		}
	}
	if checked < 20 {
		t.Errorf("checked only %d fragments: is the table still there?", checked)
	}
	if !strings.Contains(source, `"svid_failures_total"`) {
		t.Error("the metric the table names, lanyard_agent_svid_failures_total, is gone")
	}
}

// literalParts splits a quoted message where its values vary: at "...",
// at quotes (a %q value), at brackets and parentheses, at ": " (an error
// wrapping another), at a SPIFFE ID, an address, a path and a file name
// (which the code often names through a constant).
func literalParts(q string) []string {
	var out []string
	for _, p := range regexp.MustCompile(`\.\.\.|"|\[|\]|\(|\)|: |spiffe://|\d+\.\d+\.\d+\.\d+:\d+|[\w-]+\.(json|pem|hcl)\b|(/[\w.-]+){2,}`).Split(q, -1) {
		// A path's directory is elided with "..."; its file name stays.
		if p = strings.TrimPrefix(strings.TrimSpace(p), "/"); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// section returns the text from heading to the next heading of its level.
func section(doc, heading string) string {
	i := strings.Index(doc, "\n"+heading+"\n")
	if i < 0 {
		return ""
	}
	rest := doc[i+len(heading)+2:]
	if j := strings.Index(rest, "\n## "); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

// sourceText is every non-test Go file of the repository, concatenated.
func sourceText(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		b.Write(src)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

package layering

import (
	"errors"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/lanyard-dev/lanyard"

// TestLayering fails on a forbidden edge anywhere in the non-test import
// graph of each group of packages: the Workload API must not link the TPM
// stack (it needs only a caller's Process), the signer must not link the
// /proc parsing of workload attestation, and neither attestor half nor the
// Workload API may know the signer.
func TestLayering(t *testing.T) {
	tests := []struct {
		name     string
		patterns []string
		forbid   []string // import path prefixes
	}{
		{
			name:     "workloadapi knows neither the TPM nor the signer",
			patterns: []string{"./workloadapi/..."},
			forbid:   []string{"github.com/google/go-tpm", "github.com/google/go-attestation", module + "/attestor/node", module + "/signer", module + "/agent"},
		},
		{
			name:     "the signer links no workload attestation and no agent",
			patterns: []string{"./cmd/lanyard-signer", "./signer/..."},
			forbid:   []string{module + "/attestor/workload", module + "/agent", module + "/workloadapi"},
		},
		{
			name:     "attestor knows nothing of the signer, the agent or the Workload API",
			patterns: []string{"./attestor/..."},
			forbid:   []string{module + "/signer", module + "/agent", module + "/workloadapi"},
		},
		{
			name:     "workload attestation links no TPM",
			patterns: []string{"./attestor/workload/..."},
			forbid:   []string{"github.com/google/go-tpm", "github.com/google/go-attestation", module + "/attestor/node"},
		},
		{
			name:     "selector is a leaf",
			patterns: []string{"./selector/..."},
			forbid:   []string{module + "/", "github.com/", "golang.org/", "google.golang.org/"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			deps := listDeps(t, tt.patterns)
			if len(deps) == 0 {
				t.Fatalf("%v matches no package", tt.patterns)
			}
			for pkg, ds := range deps {
				for _, d := range ds {
					for _, f := range tt.forbid {
						if d == strings.TrimSuffix(f, "/") || strings.HasPrefix(d, strings.TrimSuffix(f, "/")+"/") {
							t.Errorf("%s depends on %s", pkg, d)
						}
					}
				}
			}
		})
	}
}

// listDeps returns every package the patterns match, with its transitive
// non-test dependencies.
func listDeps(t *testing.T, patterns []string) map[string][]string {
	t.Helper()
	args := append([]string{"list", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`}, patterns...)
	cmd := exec.Command("go", args...)
	cmd.Dir = "../.." // the module root
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := errors.AsType[*exec.ExitError](err); ok {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, ee.Stderr)
		}
		t.Fatalf("go %s: %v", strings.Join(args, " "), err)
	}
	deps := make(map[string][]string)
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) > 0 {
			deps[f[0]] = f[1:]
		}
	}
	return deps
}

package policy

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

// actionsPolicy is a workload "w" whose body (starting on line 6) is the
// actions block given.
func actionsPolicy(block string) string {
	return `node "n1" { ek_sha256 = ["` + hashA + `"] }
workload "w" {
  spiffe_id = "spiffe://example.org/w"
  nodes     = ["n1"]
  selectors = ["unix:uid:1"]
` + block + "\n}\n"
}

func TestParseActions(t *testing.T) {
	p, err := Parse([]byte(actionsPolicy(`  actions {
    ttl   = "60s"
    names = ["github.read", "db/*/migrate", "tool-x_1"]
  }`)), "policy.hcl", testTD)
	if err != nil {
		t.Fatal(err)
	}
	want := &Actions{TTL: time.Minute, Names: []string{"github.read", "db/*/migrate", "tool-x_1"}}
	if diff := cmp.Diff(want, p.Workloads[0].Actions); diff != "" {
		t.Errorf("actions (-want +got):\n%s", diff)
	}
	p, err = Parse([]byte(actionsPolicy("")), "policy.hcl", testTD)
	if err != nil {
		t.Fatal(err)
	}
	if p.Workloads[0].Actions != nil {
		t.Errorf("a workload without an actions block has actions %+v", p.Workloads[0].Actions)
	}
}

func TestParseActionsErrors(t *testing.T) {
	block := func(ttl, names string) string {
		return "  actions {\n    ttl = " + ttl + "\n    names = " + names + "\n  }" // ttl on line 7, names on 8
	}
	tests := []struct {
		name, block string
		want        []string
	}{
		{"ttl missing", "  actions {\n    names = [\"a\"]\n  }", []string{
			`$F:6: Missing required argument: The argument "ttl" is required, but no definition was found.`,
		}},
		{"names missing", "  actions {\n    ttl = \"60s\"\n  }", []string{
			`$F:6: Missing required argument: The argument "names" is required, but no definition was found.`,
		}},
		{"ttl below 1s", block(`"500ms"`, `["a"]`), []string{`$F:7: ttl: 500ms is below the minimum of 1s`}},
		{"ttl above 5m", block(`"6m"`, `["a"]`), []string{`$F:7: actions: ttl: 6m0s is above the maximum of 5m0s: an action token is for one step`}},
		{"ttl not whole seconds", block(`"1500ms"`, `["a"]`), []string{`$F:7: actions: ttl: 1.5s is not a whole number of seconds`}},
		{"ttl unparsable", block(`"soon"`, `["a"]`), []string{`$F:7: ttl: invalid duration "soon" (write it like "90s", "5m" or "1h")`}},
		{"names empty", block(`"60s"`, `[]`), []string{`$F:8: actions: names: at least one name is required`}},
		{"name empty", block(`"60s"`, `[""]`), []string{`$F:8: actions: names: "": empty name`}},
		{"name with a space", block(`"60s"`, `["db read"]`), []string{
			`$F:8: actions: names: "db read": segment 1 "db read": use letters, digits, '.', '-' and '_', or exactly "*" for any one segment`,
		}},
		{"partial wildcard", block(`"60s"`, `["db.*"]`), []string{
			`$F:8: actions: names: "db.*": segment 1 "db.*": use letters, digits, '.', '-' and '_', or exactly "*" for any one segment`,
		}},
		{"leading slash", block(`"60s"`, `["/db"]`), []string{
			`$F:8: actions: names: "/db": segment 1 is empty (no leading, trailing or doubled '/')`,
		}},
		{"dot segment", block(`"60s"`, `["db/../x"]`), []string{`$F:8: actions: names: "db/../x": segment 2 is ".."`}},
		{"duplicate", "  actions {\n    ttl = \"60s\"\n    names = [\n      \"a\",\n      \"a\",\n    ]\n  }", []string{
			`$F:10: actions: names: "a" is listed twice (first at line 9)`,
		}},
		{"two blocks", block(`"60s"`, `["a"]`) + "\n" + block(`"60s"`, `["b"]`), []string{
			`$F:10: only one actions block is allowed (first at line 6)`,
		}},
		{"unknown attribute", "  actions {\n    ttl = \"60s\"\n    names = [\"a\"]\n    max = 3\n  }", []string{
			`$F:9: Unsupported argument: An argument named "max" is not expected here.`,
		}},
		{"too long", block(`"60s"`, `["`+strings.Repeat("a", 257)+`"]`), []string{
			`$F:8: actions: names: "` + strings.Repeat("a", 257) + `": 257 bytes (limit 256)`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "policy.hcl")
			p, err := Parse([]byte(actionsPolicy(tt.block)), file, testTD)
			if p != nil {
				t.Errorf("Parse returned a policy along with errors")
			}
			var errs hclconf.Errors
			if !errors.As(err, &errs) {
				t.Fatalf("Parse error = %v, want hclconf.Errors", err)
			}
			var got []string
			for _, e := range errs {
				got = append(got, e.Error())
			}
			want := make([]string, len(tt.want))
			for i, w := range tt.want {
				want[i] = strings.Replace(w, "$F:", file+":", 1)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("errors mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestActionsAllows(t *testing.T) {
	a := &Actions{TTL: time.Minute, Names: []string{"github.read", "db/*", "repo/*/push"}}
	for _, tc := range []struct {
		action string
		want   bool
	}{
		{"github.read", true},
		{"github.write", false},
		{"github", false},
		{"db/main", true},
		{"db", false},
		{"db/main/drop", false},
		{"db/*", false}, // a request names an action, never a pattern
		{"repo/lanyard/push", true},
		{"repo/lanyard/pull", false},
		{"repo//push", false},
		{"", false},
	} {
		t.Run(tc.action, func(t *testing.T) {
			if got := a.Allows(tc.action); got != tc.want {
				t.Errorf("Allows(%q) = %v, want %v", tc.action, got, tc.want)
			}
		})
	}
	if (*Actions)(nil).Allows("github.read") {
		t.Error("nil actions allow an action")
	}
}

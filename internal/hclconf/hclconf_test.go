package hclconf

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/hcl/v2"
)

func TestErrorFormat(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"with line", Error{File: "a.hcl", Line: 3, Msg: "bad"}, "a.hcl:3: bad"},
		{"without line", Error{File: "a.hcl", Msg: "bad"}, "a.hcl: bad"},
		{"several", Errors{{File: "a.hcl", Line: 1, Msg: "x"}, {File: "a.hcl", Line: 2, Msg: "y"}}, "a.hcl:1: x\na.hcl:2: y"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestErrorsErr(t *testing.T) {
	if err := Errors(nil).Err(); err != nil {
		t.Errorf("empty Errors.Err() = %v, want nil", err)
	}
	err := fmt.Errorf("load: %w", Errors{{File: "a.hcl", Line: 1, Msg: "x"}}.Err())
	var es Errors
	if !errors.As(err, &es) || len(es) != 1 {
		t.Errorf("errors.As through a wrap: got %v", es)
	}
}

func TestFromDiagnostics(t *testing.T) {
	at := func(file string, line int) *hcl.Range {
		return &hcl.Range{Filename: file, Start: hcl.Pos{Line: line}, End: hcl.Pos{Line: line}}
	}
	diags := hcl.Diagnostics{
		{Severity: hcl.DiagError, Summary: "third", Subject: at("a.hcl", 9)},
		{Severity: hcl.DiagWarning, Summary: "a warning", Subject: at("a.hcl", 1)},
		{Severity: hcl.DiagError, Summary: "Unsupported argument", Detail: "An argument named \"x\" is not expected here.", Subject: at("a.hcl", 2)},
		{Severity: hcl.DiagError, Summary: "third", Subject: at("a.hcl", 9)},
		{Severity: hcl.DiagError, Summary: "first of line 2", Subject: at("a.hcl", 2)},
		{Severity: hcl.DiagError, Summary: "nowhere"},
	}
	want := Errors{
		{Msg: "nowhere"},
		{File: "a.hcl", Line: 2, Msg: `Unsupported argument: An argument named "x" is not expected here.`},
		{File: "a.hcl", Line: 2, Msg: "first of line 2"},
		{File: "a.hcl", Line: 9, Msg: "third"},
	}
	if diff := cmp.Diff(want, FromDiagnostics(diags)); diff != "" {
		t.Errorf("FromDiagnostics (-want +got):\n%s", diff)
	}
	if got := FromDiagnostics(hcl.Diagnostics{diags[1]}); got.Err() != nil {
		t.Errorf("warnings only: got %v, want no errors", got)
	}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		src     string
		wantErr string
	}{
		{"valid", "a = 1\nb { c = \"d\" }\n", ""},
		{"empty", "", ""},
		{"unterminated string", "a = \"x\n", `f.hcl:1: Invalid multi-line string: Quoted strings may not be split over multiple lines. To produce a multi-line string, either use the \n escape to represent a newline character or use the "heredoc" multi-line template syntax.` +
			"\nf.hcl:1: Unterminated template string: No closing marker was found for the string."},
		// hclsyntax gives up on a body at its first error: one report.
		{"syntax error in a block", "a {\n x = 1 2\n}\nb {\n y = 3 4\n}\n", "f.hcl:2: Missing newline after argument: An argument definition must end with a newline."},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body, diags := Parse([]byte(tt.src), "f.hcl")
			got := ""
			if err := FromDiagnostics(diags).Err(); err != nil {
				got = err.Error()
			}
			if got != tt.wantErr {
				t.Errorf("Parse errors:\n got %q\nwant %q", got, tt.wantErr)
			}
			if (body == nil) != (tt.wantErr != "") {
				t.Errorf("body = %v, want a body exactly when the syntax is valid", body)
			}
		})
	}
}

// attr parses `src` (one attribute "v") and returns it.
func attr(t *testing.T, src string) *hcl.Attribute {
	t.Helper()
	body, diags := Parse([]byte(src), "f.hcl")
	if diags.HasErrors() {
		t.Fatalf("parse %q: %v", src, diags)
	}
	content, diags := body.Content(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "v"}}})
	if diags.HasErrors() {
		t.Fatalf("content %q: %v", src, diags)
	}
	return content.Attributes["v"]
}

func TestDecoders(t *testing.T) {
	dir := t.TempDir()
	str := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return String(a) }
	nonEmpty := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return NonEmptyString(a) }
	dur := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return Duration(a, 10*time.Second) }
	count := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return Int(a, 1, 100) }
	level := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return LogLevel(a) }
	format := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return LogFormat(a) }
	listen := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return HostPort(a, true) }
	dial := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return HostPort(a, false) }
	path := func(a *hcl.Attribute) (any, hcl.Diagnostics) { return Path(a, dir) }
	td := func(a *hcl.Attribute) (any, hcl.Diagnostics) {
		v, d := TrustDomain(a)
		return v.Name(), d
	}
	list := func(a *hcl.Attribute) (any, hcl.Diagnostics) {
		items, d := StringList(a)
		var out []string
		for _, it := range items {
			out = append(out, fmt.Sprintf("%s@%d", it.Value, it.Range.Start.Line))
		}
		return out, d
	}
	tests := []struct {
		name    string
		decode  func(*hcl.Attribute) (any, hcl.Diagnostics)
		src     string
		want    any
		wantErr string
	}{
		{"string", str, `v = "x"`, "x", ""},
		{"string from heredoc", str, "v = <<EOT\nx\nEOT\n", "x\n", ""},
		{"string, number given", str, `v = 8443`, "", "f.hcl:1: v: expected a string, got number"},
		{"string, bool given", str, `v = true`, "", "f.hcl:1: v: expected a string, got bool"},
		{"string, null given", str, `v = null`, "", "f.hcl:1: v: must not be null"},
		{"string, list given", str, `v = ["x"]`, "", "f.hcl:1: v: expected a string, got tuple"},
		{"string, variable", str, `v = "${x}"`, "", "f.hcl:1: Variables not allowed: Variables may not be used here."},
		{"string, function call", str, `v = upper("x")`, "", `f.hcl:1: Function calls not allowed: Functions may not be called here.`},
		{"non-empty", nonEmpty, `v = "x"`, "x", ""},
		{"non-empty, empty", nonEmpty, `v = " "`, "", "f.hcl:1: v: must not be empty"},
		{"list, one element per line", list, "v = [\n  \"a\",\n  \"b\",\n]\n", []string{"a@2", "b@3"}, ""},
		{"list, empty", list, `v = []`, []string(nil), ""},
		{"list, string given", list, `v = "a"`, []string(nil), "f.hcl:1: v: expected a list of strings, got string"},
		{"list, object given", list, `v = { a = "b" }`, []string(nil), "f.hcl:1: v: expected a list of strings, got object"},
		{"list, null given", list, `v = null`, []string(nil), "f.hcl:1: v: must not be null"},
		{"list, bad elements", list, "v = [\n \"a\",\n 1,\n null,\n]\n", []string{"a@2"}, "f.hcl:3: v[1]: expected a string, got number\nf.hcl:4: v[2]: must not be null"},
		{"list from a for expression", list, "v = [for s in [\"a\"] : s]", []string{"a@1"}, ""},
		{"int", count, `v = 64`, 64, ""},
		{"int, quoted", count, `v = "64"`, 0, "f.hcl:1: v: expected a whole number, got string"},
		{"int, fraction", count, `v = 1.5`, 0, "f.hcl:1: v: 1.5 is not a whole number from 1 to 100"},
		{"int, below", count, `v = 0`, 0, "f.hcl:1: v: 0 is not a whole number from 1 to 100"},
		{"int, above", count, `v = 101`, 0, "f.hcl:1: v: 101 is not a whole number from 1 to 100"},
		{"int, huge", count, `v = 1e30`, 0, "f.hcl:1: v: 1000000000000000000000000000000 is not a whole number from 1 to 100"},
		{"int, null", count, `v = null`, 0, "f.hcl:1: v: must not be null"},
		{"duration", dur, `v = "1h30m"`, 90 * time.Minute, ""},
		{"duration at the minimum", dur, `v = "10s"`, 10 * time.Second, ""},
		{"duration below the minimum", dur, `v = "9.5s"`, time.Duration(0), "f.hcl:1: v: 9.5s is below the minimum of 10s"},
		{"duration negative", dur, `v = "-1h"`, time.Duration(0), "f.hcl:1: v: -1h is below the minimum of 10s"},
		{"duration without unit", dur, `v = "60"`, time.Duration(0), `f.hcl:1: v: invalid duration "60" (write it like "90s", "5m" or "1h")`},
		{"duration in days", dur, `v = "1d"`, time.Duration(0), `f.hcl:1: v: invalid duration "1d" (write it like "90s", "5m" or "1h")`},
		{"log level", level, `v = "warn"`, "warn", ""},
		{"log level unknown", level, `v = "WARN"`, "", `f.hcl:1: v: "WARN" is not one of trace, debug, info, warn, error`},
		{"log format", format, `v = "json"`, "json", ""},
		{"log format unknown", format, `v = "logfmt"`, "", `f.hcl:1: v: "logfmt" is not one of text, json`},
		{"listen address", listen, `v = "127.0.0.1:8443"`, "127.0.0.1:8443", ""},
		{"listen on every address", listen, `v = ":8443"`, ":8443", ""},
		{"listen on any port", listen, `v = "[::1]:0"`, "[::1]:0", ""},
		{"listen without port", listen, `v = "127.0.0.1"`, "", `f.hcl:1: v: "127.0.0.1" is not host:port`},
		{"listen on a named port", listen, `v = "localhost:https"`, "", `f.hcl:1: v: "localhost:https": port must be a number from 1 to 65535`},
		{"dial address", dial, `v = "signer.example.org:8443"`, "signer.example.org:8443", ""},
		{"dial without host", dial, `v = ":8443"`, "", `f.hcl:1: v: ":8443" has no host`},
		{"dial port 0", dial, `v = "a:0"`, "", `f.hcl:1: v: "a:0": port must be a number from 1 to 65535`},
		{"dial port too large", dial, `v = "a:65536"`, "", `f.hcl:1: v: "a:65536": port must be a number from 1 to 65535`},
		{"relative path", path, `v = "sub/x.pem"`, filepath.Join(dir, "sub", "x.pem"), ""},
		{"absolute path", path, `v = "/etc//x.pem"`, "/etc/x.pem", ""},
		{"empty path", path, `v = ""`, "", "f.hcl:1: v: must not be empty"},
		{"trust domain", td, `v = "example.org"`, "example.org", ""},
		{"trust domain as an ID", td, `v = "spiffe://example.org"`, "example.org", ""},
		{"trust domain upper case", td, `v = "Example.org"`, "", `f.hcl:1: v: "Example.org": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, diags := tt.decode(attr(t, tt.src))
			gotErr := ""
			if err := FromDiagnostics(diags).Err(); err != nil {
				gotErr = err.Error()
			}
			if gotErr != tt.wantErr {
				t.Errorf("errors:\n got %q\nwant %q", gotErr, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("value (-want +got):\n%s", diff)
			}
		})
	}
}

func TestBaseDirAndResolve(t *testing.T) {
	wd, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		file, path, want string
	}{
		{"/etc/lanyard/signer.hcl", "policy.hcl", "/etc/lanyard/policy.hcl"},
		{"/etc/lanyard/signer.hcl", "../x/policy.hcl", "/etc/x/policy.hcl"},
		{"/etc/lanyard/signer.hcl", "/srv/policy.hcl", "/srv/policy.hcl"},
		{"signer.hcl", "policy.hcl", filepath.Join(wd, "policy.hcl")},
		{"conf/signer.hcl", "./policy.hcl", filepath.Join(wd, "conf", "policy.hcl")},
	}
	for _, tt := range tests {
		t.Run(tt.file+"+"+tt.path, func(t *testing.T) {
			if got := Resolve(BaseDir(tt.file), tt.path); got != tt.want {
				t.Errorf("Resolve(BaseDir(%q), %q) = %q, want %q", tt.file, tt.path, got, tt.want)
			}
		})
	}
}

func TestOneBlock(t *testing.T) {
	schema := &hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "n"}}}
	blocks := func(src string) hcl.Blocks {
		body, diags := Parse([]byte(src), "f.hcl")
		if diags.HasErrors() {
			t.Fatal(diags)
		}
		c, diags := body.Content(&hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{{Type: "limits"}}})
		if diags.HasErrors() {
			t.Fatal(diags)
		}
		return c.Blocks
	}
	if c, d := OneBlock(blocks(""), schema); c != nil || d.HasErrors() {
		t.Errorf("no block: content %v, diags %v; want nil, none", c, d)
	}
	c, d := OneBlock(blocks("limits {\n  n = 1\n}\nlimits {\n  n = 2\n}\n"), schema)
	if c == nil || c.Attributes["n"] == nil {
		t.Fatal("two blocks: the first one's content is missing")
	}
	if got, want := FromDiagnostics(d).Error(), "f.hcl:4: only one limits block is allowed (first at line 1)"; got != want {
		t.Errorf("two blocks: %q, want %q", got, want)
	}
}

// Package hclconf holds what Lanyard's HCL files (signer config, agent
// config, policy) share: decoding attributes with their source ranges, and
// reporting every problem as "file:line: message" so an operator can fix a
// file in one pass instead of one error per run.
package hclconf

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/hashicorp/hcl/v2"
)

// Error is one problem in a config file, located by file and line.
type Error struct {
	File string
	Line int // 1-based; 0 when the problem has no position
	Msg  string
}

// Error formats the problem as "file:line: message", the form editors and
// `lanyard-signer policy check` print.
func (e Error) Error() string {
	if e.Line <= 0 {
		return fmt.Sprintf("%s: %s", e.File, e.Msg)
	}
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
}

// Errors is every problem found in one file, in line order. Callers find it
// with errors.As to print or count the individual problems.
type Errors []Error

// Error joins the problems one per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Err returns es as an error, or nil when there are no problems, so that a
// nil Errors never becomes a non-nil error interface.
func (es Errors) Err() error {
	if len(es) == 0 {
		return nil
	}
	return es
}

// FromDiagnostics converts the error diagnostics in diags (warnings are
// dropped) into Errors sorted by file and line, without duplicates.
func FromDiagnostics(diags hcl.Diagnostics) Errors {
	var es Errors
	for _, d := range diags {
		if d.Severity != hcl.DiagError {
			continue
		}
		e := Error{Msg: d.Summary}
		if d.Detail != "" {
			e.Msg = d.Summary + ": " + d.Detail
		}
		if d.Subject != nil {
			e.File, e.Line = d.Subject.Filename, d.Subject.Start.Line
		}
		es = append(es, e)
	}
	slices.SortStableFunc(es, func(a, b Error) int {
		return cmp.Or(cmp.Compare(a.File, b.File), cmp.Compare(a.Line, b.Line))
	})
	return slices.Compact(es)
}

// Errorf builds an error diagnostic located at rng; decoders collect these
// and convert them all at once with FromDiagnostics.
func Errorf(rng hcl.Range, format string, args ...any) *hcl.Diagnostic {
	return &hcl.Diagnostic{
		Severity: hcl.DiagError,
		Summary:  fmt.Sprintf(format, args...),
		Subject:  rng.Ptr(),
	}
}

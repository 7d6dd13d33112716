package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
)

// goal is one of the figures issue 19 sets a target for, read from the
// table's rows so the summary and the table can never disagree.
type goal struct {
	Figure string
	Row    string              // the row it is read from (prefix of its name)
	Value  func(r row) float64 // this run's figure
	Floor  func(r row) float64 // the floor's figure in the same run; nil: none
	Target float64             // the goal
	AtMost bool                // true: met when Value <= Target; false: when >=
	Format func(v float64) string
}

func ratio(v float64) string  { return fmt.Sprintf("x%.2f", v) }
func millis(v float64) string { return fmt.Sprintf("%.2f ms", v) }
func mebi(v float64) string   { return fmt.Sprintf("%.1f MiB", v) }

// goals are the targets of issue 19 ("Closer to the floor"), against a
// floor (a bare gRPC server replaying the agent's response, in its own
// process) measured in the same run.
var goals = []goal{
	{Figure: "one-shot p50, ratio to the floor", Row: "one-shot FetchX509SVID, sequential",
		Value: func(r row) float64 { return r.Median / r.Floor }, Target: 1.15, AtMost: true, Format: ratio},
	{Figure: "one-shot p99", Row: "one-shot FetchX509SVID, sequential",
		Value: func(r row) float64 { return r.P99 }, Floor: func(r row) float64 { return r.FloorP99 }, Target: 1.2, AtMost: true, Format: millis},
	{Figure: "32 concurrent clients, calls/s as share of the floor", Row: "one-shot calls/s, 32 clients",
		Value: func(r row) float64 { return r.Median / r.Floor }, Target: 0.9, Format: ratio},
	{Figure: "RSS idle", Row: "agent RSS idle, 1 entry",
		Value: func(r row) float64 { return r.Median }, Target: 16, AtMost: true, Format: mebi},
	{Figure: "RSS per 1,000 open streams", Row: "agent RSS added per 1,000 streams (at 1000)",
		Value: func(r row) float64 { return r.Median }, Target: 12, AtMost: true, Format: mebi},
}

// printGoals writes, after the table, each goal with this run's figure,
// the floor's and whether it is met; a goal whose row this run did not
// measure says so.
func printGoals(w io.Writer, rows []row) {
	fmt.Fprintln(w, "\ngoals (issue 19), this run:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tthis run\tfloor\tgoal\tmet")
	for _, g := range goals {
		r, ok := findRow(rows, g.Row)
		if !ok {
			fmt.Fprintf(tw, "%s\tnot measured\t-\t%s\t-\n", g.Figure, bound(g))
			continue
		}
		v := g.Value(r)
		floor := "-"
		if g.Floor != nil && !math.IsNaN(g.Floor(r)) {
			floor = g.Format(g.Floor(r))
		}
		met := "no"
		if (g.AtMost && v <= g.Target) || (!g.AtMost && v >= g.Target) {
			met = "yes"
		}
		if math.IsNaN(v) || math.IsInf(v, 0) {
			fmt.Fprintf(tw, "%s\tnot measured\t%s\t%s\t-\n", g.Figure, floor, bound(g))
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", g.Figure, g.Format(v), floor, bound(g), met)
	}
	tw.Flush()
}

func bound(g goal) string {
	if g.AtMost {
		return "<= " + g.Format(g.Target)
	}
	return ">= " + g.Format(g.Target)
}

func findRow(rows []row, prefix string) (row, bool) {
	for _, r := range rows {
		if strings.HasPrefix(r.Name, prefix) {
			return r, true
		}
	}
	return row{}, false
}

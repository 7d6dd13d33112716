package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// row is one figure of the table. Durations are in milliseconds, rates in
// their own unit; a row with one value (a rate, an RSS) leaves Min and P99
// at NaN.
type row struct {
	Name   string
	N      int
	Unit   string
	Min    float64
	Median float64
	P99    float64
	// Floor is the floor's median for the same figure (NaN when the figure
	// has no floor); the table prints Median/Floor.
	Floor float64
	// FloorP99 is the floor's p99 (NaN when not measured); the goals
	// summary prints it beside the agent's.
	FloorP99 float64
	Note     string
}

// durationRow summarises latencies as min/median/p99 in milliseconds.
func durationRow(name string, ds []time.Duration, note string) row {
	r := row{Name: name, N: len(ds), Unit: "ms", Min: math.NaN(), Median: math.NaN(), P99: math.NaN(), Floor: math.NaN(), FloorP99: math.NaN(), Note: note}
	if len(ds) == 0 {
		return r
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	r.Min = ms(s[0])
	r.Median = ms(quantile(s, 0.5))
	r.P99 = ms(quantile(s, 0.99))
	return r
}

// valuesRow summarises plain values (rates, sizes) as min/median/p99.
func valuesRow(name, unit string, vs []float64, note string) row {
	r := row{Name: name, N: len(vs), Unit: unit, Min: math.NaN(), Median: math.NaN(), P99: math.NaN(), Floor: math.NaN(), FloorP99: math.NaN(), Note: note}
	if len(vs) == 0 {
		return r
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	r.Min = s[0]
	r.Median = s[(len(s)-1)/2]
	r.P99 = s[min(len(s)-1, int(math.Ceil(float64(len(s))*0.99))-1)]
	return r
}

// singleRow is a figure measured once.
func singleRow(name, unit string, n int, v float64, note string) row {
	return row{Name: name, N: n, Unit: unit, Min: math.NaN(), Median: v, P99: math.NaN(), Floor: math.NaN(), FloorP99: math.NaN(), Note: note}
}

// quantile is the nearest-rank q-quantile of sorted s.
func quantile(s []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(float64(len(s))*q)) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// printTable writes the machine facts and the rows, aligned.
func printTable(w io.Writer, rows []row) {
	fmt.Fprintf(w, "machine: %s\n\n", machineInfo())
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tN\tmin\tmedian\tp99\tunit\tfloor median\tx floor\tnote")
	for _, r := range rows {
		ratio := "-"
		if !math.IsNaN(r.Floor) && r.Floor != 0 && !math.IsNaN(r.Median) {
			ratio = fmt.Sprintf("x%.2f", r.Median/r.Floor)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, r.N, num(r.Min), num(r.Median), num(r.P99), r.Unit, num(r.Floor), ratio, r.Note)
	}
	tw.Flush()
}

func num(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v >= 1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// machineInfo names the CPU model, the cores, the kernel and Go: a figure
// means nothing without them.
func machineInfo() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "unknown kernel"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = "Linux " + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%s, %d cores, %s, %s %s/%s", cpu, runtime.NumCPU(), kernel, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

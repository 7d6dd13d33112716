package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// goBenchRows turns `go test -bench` output into rows: one per metric of
// each benchmark line, skipping the allocation counts; ns/op also becomes
// operations per second (per core: the benchmarks run one goroutine).
func goBenchRows(path string) ([]row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read go bench output: %w", err)
	}
	defer f.Close()
	var rows []row
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
			continue
		}
		n, err := strconv.Atoi(fields[1])
		if err != nil {
			continue
		}
		name := fields[0]
		for i := 2; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				break
			}
			unit := fields[i+1]
			switch unit {
			case "B/op", "allocs/op":
				continue
			case "ns/op":
				if n == 1 {
					continue // a run-once benchmark (the scale run) reports its own figures
				}
				rows = append(rows,
					singleRow(name, "µs/op", n, v/1000, "go test -bench"),
					singleRow(name, "ops/s/core", n, 1e9/v, "1 / (ns/op)"))
			default:
				rows = append(rows, singleRow(name, unit, n, v, "go test -bench"))
			}
		}
	}
	return rows, sc.Err()
}

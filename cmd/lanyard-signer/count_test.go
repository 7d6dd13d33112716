package main

import "testing"

func TestCount(t *testing.T) {
	tests := []struct {
		n    int
		want string
	}{
		{0, "0 workload entries"},
		{1, "1 workload entry"},
		{2, "2 workload entries"},
	}
	for _, tc := range tests {
		if got := count(tc.n, "workload entry", "workload entries"); got != tc.want {
			t.Errorf("count(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

package testport

import (
	"net"
	"strconv"
	"testing"
)

// TestFree: ports are distinct, bindable, and below the ephemeral range.
func TestFree(t *testing.T) {
	seen := map[string]bool{}
	for range 50 {
		addr := Free(t)
		if seen[addr] {
			t.Fatalf("%s handed out twice", addr)
		}
		seen[addr] = true
		_, p, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := strconv.Atoi(p); n < 10000 || n >= 32768 {
			t.Errorf("port %d outside [10000, 32768)", n)
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("bind %s: %v", addr, err)
		}
		l.Close()
	}
}

// Package testport hands tests loopback ports that a daemon can bind
// again after a restart.
package testport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

var (
	mu   sync.Mutex
	used = map[int]bool{}
)

// Free returns a loopback host:port nothing listens on right now, with a
// port below the kernel's ephemeral range: a daemon restarted on the same
// address (a signer restart, an etcd member's, a tier's rolling restart)
// must be able to bind it again, and a port from the ephemeral range may
// meanwhile have become the local end of some other test's outgoing
// connection. A port handed out once is not handed out again by this
// process.
func Free(t testing.TB) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				low = n
			}
		}
	}
	for range 1000 {
		port := 10000 + rand.IntN(low-10000)
		if used[port] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		l.Close()
		used[port] = true
		return l.Addr().String()
	}
	t.Fatal("testport: no free loopback port below the ephemeral range")
	return ""
}

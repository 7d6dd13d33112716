package agent

import (
	"crypto/x509"
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// benchCache is a cache holding entries entries with an SVID each: entry
// e0 asks only for the caller's uid, the others for the uid and a systemd
// unit the caller is not in, so the caller matches one entry and every
// other entry is checked and refused, as on a host with many services.
func benchCache(b *testing.B, entries int) (*cache, []string) {
	b.Helper()
	ca := fanoutCA(b)
	uid := "unix:uid:" + strconv.Itoa(os.Getuid())
	c := newCache("example.org")
	c.setBundle([]*x509.Certificate{ca.Cert})
	es := make([]*entry, entries)
	ss := make([]*svid, entries)
	leaf := ca.leaf(b, 1)
	for i := range es {
		id := fmt.Sprintf("e%d", i)
		sel := []string{uid}
		if i > 0 {
			sel = append(sel, fmt.Sprintf("systemd:unit:svc-%d.service", i))
		}
		es[i] = &entry{ID: id, SPIFFEID: spiffeid.RequireFromString("spiffe://example.org/" + id), Selectors: sel, Revision: 1}
		s := *leaf
		s.key = entryKey{id, 1}
		ss[i] = &s
	}
	c.setEntries(es)
	c.putSVIDs(ss)
	// What the unix attestor finds for this process, sorted as the
	// workload attestor hands them over.
	have := []string{uid, "unix:gid:" + strconv.Itoa(os.Getgid()), "unix:path:/usr/bin/bench", "systemd:unit:caller.service"}
	slices.Sort(have)
	return c, have
}

// BenchmarkEntryMatching measures a Workload API lookup once the response
// is built: the caller's selectors find the remembered match and the shared
// response. This is what each call and each woken stream pays; "cold"
// forgets the match each time, so every entry's selectors are checked
// against the caller's (what the first caller after a change pays).
func BenchmarkEntryMatching(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			c, have := benchCache(b, n)
			if r, _ := c.X509SVIDResponse(have); len(r.GetSvids()) != 1 {
				b.Fatalf("caller matched %d SVIDs, want 1", len(r.GetSvids()))
			}
			for _, cold := range []bool{false, true} {
				b.Run(map[bool]string{false: "warm", true: "cold"}[cold], func(b *testing.B) {
					b.ReportAllocs()
					for i := 0; i < b.N; i++ {
						if cold {
							c.mu.Lock()
							clear(c.matched)
							c.mu.Unlock()
						}
						if r, _ := c.X509SVIDResponse(have); r == nil {
							b.Fatal("no response")
						}
					}
				})
			}
		})
	}
}

// BenchmarkResponseBuilding measures building the X509SVIDResponse from
// scratch, matching included: what the first caller after a change pays
// before the response is shared.
func BenchmarkResponseBuilding(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			c, have := benchCache(b, n)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c.mu.Lock()
				clear(c.responses)
				clear(c.matched)
				c.mu.Unlock()
				if r, _ := c.X509SVIDResponse(have); len(r.GetSvids()) != 1 {
					b.Fatal("no response")
				}
			}
		})
	}
}

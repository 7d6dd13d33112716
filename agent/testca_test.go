package agent

import (
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// testCA is a self-signed CA of example.org for the agent's tests: the
// trust file's authorities, the fan-out's leaves, the fake signer's CAs.
type testCA struct{ *testca.CA }

func newTestCA(tb testing.TB, name string) *testCA {
	tb.Helper()
	return &testCA{testca.New(tb, name, spiffeid.RequireTrustDomainFromString("example.org"))}
}

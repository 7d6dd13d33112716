package agent

import (
	"context"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/leakcheck"
)

// TestMain fails the package when a goroutine of ours outlives the tests:
// every part must stop when its Run returns.
func TestMain(m *testing.M) { leakcheck.Main(m) }

// runPart runs a part until the test ends, then stops it and checks that
// Run returned without error: Run must return once ctx ends, with its
// goroutines ended.
func runPart(t testing.TB, run func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

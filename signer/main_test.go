package signer

import (
	"testing"

	"github.com/lanyard-dev/lanyard/internal/leakcheck"
)

// TestMain fails the package when a goroutine of ours outlives the tests:
// every part of the signer must stop when its Run or Serve returns.
func TestMain(m *testing.M) { leakcheck.Main(m) }

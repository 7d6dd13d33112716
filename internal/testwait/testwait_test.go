package testwait

import (
	"sync/atomic"
	"testing"
	"time"
)

func TestFor(t *testing.T) {
	var n atomic.Int32
	For(t, 10*time.Second, "the third look", func() bool { return n.Add(1) == 3 })
	if got := n.Load(); got != 3 {
		t.Errorf("cond called %d times, want 3", got)
	}
}

// failRecorder is a testing.TB that records Fatalf instead of stopping.
type failRecorder struct {
	testing.TB
	failed bool
	msg    string
}

func (f *failRecorder) Helper() {}
func (f *failRecorder) Fatalf(format string, args ...any) {
	f.failed = true
	f.msg = format
}

func TestForTimesOut(t *testing.T) {
	f := &failRecorder{TB: t}
	For(f, 20*time.Millisecond, "never", func() bool { return f.failed })
	if !f.failed {
		t.Error("For did not fail when the condition never held")
	}
}

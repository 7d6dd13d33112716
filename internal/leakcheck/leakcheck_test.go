package leakcheck

import (
	"strings"
	"testing"
	"time"
)

func TestOurs(t *testing.T) {
	if leaked := poll(time.Second); leaked != "" {
		t.Fatalf("goroutines before the test:\n%s", leaked)
	}
	stop := make(chan struct{})
	go park(stop)
	if leaked := poll(100 * time.Millisecond); !strings.Contains(leaked, "leakcheck.park") {
		t.Errorf("a parked goroutine of ours is not reported; got:\n%s", leaked)
	}
	close(stop)
	if leaked := poll(time.Second); leaked != "" {
		t.Errorf("a goroutine that ended is still reported:\n%s", leaked)
	}
}

func park(stop chan struct{}) { <-stop }

package rotator

import (
	"testing"
	"time"
)

func TestRenewAt(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(time.Hour)
	tests := []struct {
		name   string
		jitter float64
		r      float64
		want   time.Duration // after notBefore
	}{
		{"half-life without jitter", 0, 0.7, 30 * time.Minute},
		{"center of window", 0.1, 0, 30 * time.Minute},
		{"earliest", 0.1, -1, 27 * time.Minute},
		{"latest", 0.1, 1, 33 * time.Minute},
		{"r clamped", 0.1, 5, 33 * time.Minute},
		{"jitter clamped to 1", 3, -1, 0},
		{"negative jitter is none", -0.5, 1, 30 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Schedule{Jitter: tt.jitter}.RenewAt(nb, na, tt.r)
			if want := nb.Add(tt.want); !got.Equal(want) {
				t.Errorf("RenewAt = %v, want %v", got, want)
			}
		})
	}
}

// TestDue: a 10 s SVID falls due at its half-life, not before (the agent's
// cache.due compares now against RenewAt; Schedule.Due, dead code, went).
func TestDue(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(10 * time.Second)
	at := Schedule{Jitter: DefaultJitter}.RenewAt(nb, na, 0)
	if nb.Add(4 * time.Second).After(at) {
		t.Error("due before half-life")
	}
	if nb.Add(5 * time.Second).Before(at) {
		t.Error("not due at half-life")
	}
}

func TestBackoff(t *testing.T) {
	b := Backoff{Base: time.Second, Max: 10 * time.Second}
	tests := []struct {
		name     string
		failures int
		r        float64
		want     time.Duration
	}{
		{"no failure no wait", 0, 0.9, 0},
		{"first failure full", 1, 1, time.Second},
		{"grows", 3, 1, 4 * time.Second},
		{"capped", 10, 1, 10 * time.Second},
		{"huge count stays capped", 1 << 20, 1, 10 * time.Second},
		{"full jitter", 3, 0.5, 2 * time.Second},
		{"floor", 3, 0, 250 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := b.Delay(tt.failures, tt.r); got != tt.want {
				t.Errorf("Delay(%d, %v) = %v, want %v", tt.failures, tt.r, got, tt.want)
			}
		})
	}
}

func TestBackoffDelayBefore(t *testing.T) {
	b := Backoff{Base: time.Second, Max: 30 * time.Second}
	tests := []struct {
		name      string
		failures  int
		r         float64
		remaining time.Duration
		want      time.Duration
	}{
		{"no failure no wait", 0, 1, time.Minute, 0},
		{"far deadline: plain backoff", 3, 1, time.Hour, 4 * time.Second},
		{"no deadline: plain backoff", 10, 1, 0, 30 * time.Second},
		{"expired already: plain backoff", 10, 1, -time.Second, 30 * time.Second},
		{"near deadline caps at a quarter", 10, 1, 20 * time.Second, 5 * time.Second},
		{"cap is jittered", 10, 0.5, 20 * time.Second, 2500 * time.Millisecond},
		{"under the cap untouched", 2, 0.5, 20 * time.Second, time.Second},
		{"last moments keep the floor", 10, 1, 100 * time.Millisecond, 250 * time.Millisecond},
		{"floor holds with zero draw", 10, 0, 20 * time.Second, 250 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := b.DelayBefore(tt.failures, tt.r, tt.remaining); got != tt.want {
				t.Errorf("DelayBefore(%d, %v, %v) = %v, want %v", tt.failures, tt.r, tt.remaining, got, tt.want)
			}
		})
	}
	t.Run("floor", func(t *testing.T) {
		// Near expiry the quarter of what remains shrinks toward zero;
		// the floor keeps retries at four a second (14/s were seen
		// without it).
		tests := []struct {
			name      string
			b         Backoff
			failures  int
			r         float64
			remaining time.Duration
			want      time.Duration
		}{
			{"last second, zero draw", DefaultBackoff, 20, 0, time.Second, 250 * time.Millisecond},
			{"last second, full draw", DefaultBackoff, 20, 1, time.Second, 250 * time.Millisecond},
			{"last 100ms", DefaultBackoff, 20, 0.5, 100 * time.Millisecond, 250 * time.Millisecond},
			{"first failure, zero draw", DefaultBackoff, 1, 0, time.Minute, 250 * time.Millisecond},
			{"above the floor untouched", DefaultBackoff, 20, 1, 4 * time.Second, time.Second},
			{"explicit floor", Backoff{Base: time.Second, Max: 30 * time.Second, Floor: 500 * time.Millisecond}, 10, 0, time.Second, 500 * time.Millisecond},
			{"zero floor is Base/4", Backoff{Base: time.Second, Max: 30 * time.Second}, 10, 0, time.Second, 250 * time.Millisecond},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if got := tt.b.DelayBefore(tt.failures, tt.r, tt.remaining); got != tt.want {
					t.Errorf("DelayBefore(%d, %v, %v) = %v, want %v", tt.failures, tt.r, tt.remaining, got, tt.want)
				}
			})
		}
		// Over an SVID's last second, however the draws fall, at most
		// four retries.
		for _, r := range []float64{0, 0.001, 0.3, 0.999} {
			n, left := 0, time.Second
			for left > 0 {
				left -= DefaultBackoff.DelayBefore(50, r, left)
				n++
			}
			if n > 4 {
				t.Errorf("draw %v: %d retries in the last second, want at most 4", r, n)
			}
		}
	})
	// However many failures, an SVID with 20 s left sees a retry at least
	// every 5 s: four or more attempts before it expires.
	for f := 1; f < 64; f++ {
		if d := b.DelayBefore(f, 1, 20*time.Second); d > 5*time.Second {
			t.Fatalf("DelayBefore(%d, 1, 20s) = %v, want at most 5s", f, d)
		}
	}
}

func TestCAPhase(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(24 * time.Hour) // activate at +12h
	const lead = 4 * time.Hour   // prepare at +8h
	tests := []struct {
		name              string
		at                time.Duration // after notBefore
		lead              time.Duration
		prepare, activate bool
	}{
		{"at issue", 0, lead, false, false},
		{"just before prepare", 8*time.Hour - time.Nanosecond, lead, false, false},
		{"prepare instant", 8 * time.Hour, lead, true, false},
		{"between", 10 * time.Hour, lead, true, false},
		{"just before activate", 12*time.Hour - time.Nanosecond, lead, true, false},
		{"activate instant", 12 * time.Hour, lead, true, true},
		{"long after expiry", 48 * time.Hour, lead, true, true},
		{"no lead prepares at activation", 12*time.Hour - time.Nanosecond, 0, false, false},
		{"no lead at activation", 12 * time.Hour, 0, true, true},
		{"negative lead is none", 11 * time.Hour, -time.Hour, false, false},
		{"lead longer than half-life clamps to notBefore", 0, 20 * time.Hour, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prepare, activate := CAPhase(nb.Add(tt.at), nb, na, tt.lead)
			if prepare != tt.prepare || activate != tt.activate {
				t.Errorf("CAPhase(+%v, lead %v) = (%v, %v), want (%v, %v)", tt.at, tt.lead, prepare, activate, tt.prepare, tt.activate)
			}
		})
	}
}

func TestCAInstants(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name              string
		lifetime, lead    time.Duration
		prepare, activate time.Duration // after notBefore
	}{
		{"defaults", 24 * time.Hour, 4 * time.Hour, 8 * time.Hour, 12 * time.Hour},
		{"one minute CA", time.Minute, 10 * time.Second, 20 * time.Second, 30 * time.Second},
		{"backdated CA", 24*time.Hour + 10*time.Second, 4 * time.Hour, 8*time.Hour + 5*time.Second, 12*time.Hour + 5*time.Second},
		{"clamped", time.Hour, 2 * time.Hour, 0, 30 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			na := nb.Add(tt.lifetime)
			if got, want := CAActivateAt(nb, na), nb.Add(tt.activate); !got.Equal(want) {
				t.Errorf("CAActivateAt = %v, want %v", got, want)
			}
			if got, want := CAPrepareAt(nb, na, tt.lead), nb.Add(tt.prepare); !got.Equal(want) {
				t.Errorf("CAPrepareAt = %v, want %v", got, want)
			}
		})
	}
}

func TestDroppable(t *testing.T) {
	keep := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name      string
		keepUntil time.Time
		now       time.Time
		want      bool
	}{
		{"before", keep, keep.Add(-time.Second), false},
		{"at the instant the last SVID is still valid", keep, keep, false},
		{"just after", keep, keep.Add(time.Nanosecond), true},
		{"long after", keep, keep.Add(24 * time.Hour), true},
		{"zero keepUntil: nothing was signed", time.Time{}, keep, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Droppable(tt.now, tt.keepUntil); got != tt.want {
				t.Errorf("Droppable(%v, %v) = %v, want %v", tt.now, tt.keepUntil, got, tt.want)
			}
			if got := !tt.now.Before(DropAt(tt.keepUntil)); got != tt.want {
				t.Errorf("now >= DropAt = %v, want %v (DropAt must be Droppable's first instant)", got, tt.want)
			}
		})
	}
}

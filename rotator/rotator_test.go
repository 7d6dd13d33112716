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

func TestDue(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(10 * time.Second)
	s := Schedule{Jitter: DefaultJitter}
	if s.Due(nb.Add(4*time.Second), nb, na, 0) {
		t.Error("due before half-life")
	}
	if !s.Due(nb.Add(5*time.Second), nb, na, 0) {
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

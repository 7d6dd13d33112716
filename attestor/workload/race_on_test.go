//go:build race

package workload

// raceEnabled: the race detector moves buffers to the heap, so
// allocation counts are not checked under it.
const raceEnabled = true

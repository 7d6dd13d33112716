package attestor

// Process is the kernel's account of a caller, taken from SO_PEERCRED when
// the Workload API accepted its connection. The PID is only a name for the
// process at that instant: a workload attestor that reads /proc must be
// able to tell when the PID has since been recycled (pidfd pinning, a later
// addition, travels next to these fields).
type Process struct {
	PID      int32
	UID, GID uint32
}

package cli

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Harden keeps the process's memory, which holds private keys, out of
// core files and out of reach of same-uid debuggers: RLIMIT_CORE 0 (soft
// and hard, so a child cannot raise it again) and PR_SET_DUMPABLE 0, which
// also makes /proc/self root-owned and refuses ptrace by other non-root
// processes. The agent reads only other processes' /proc entries, which
// this does not affect. `lanyard-agent run` and `lanyard-signer run` call
// it first thing; the CLI commands do not (a non-dumpable `fetch` could
// only be attested by an agent holding CAP_SYS_PTRACE).
func Harden() error {
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		return fmt.Errorf("disable core dumps: setrlimit RLIMIT_CORE: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("disable core dumps: prctl PR_SET_DUMPABLE: %w", err)
	}
	return nil
}

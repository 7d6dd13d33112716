package execfeed

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
)

// Exit statuses of exec itself, printed with a message on stderr: they
// cannot be told apart from the command's own, which exec passes on.
const (
	ExitSetup      = 1   // the files could not be set up
	ExitUsage      = 2   // bad flags
	ExitNoIdentity = 69  // no SVID (or JWT-SVID) within the timeout (EX_UNAVAILABLE)
	ExitCannotRun  = 126 // the command is not executable (as a shell says)
	ExitNotFound   = 127 // the command does not exist (as a shell says)
)

// Defaults.
const (
	DefaultTimeout = 30 * time.Second
	// DefaultGrace is how long a replaced generation stays: a reader that
	// resolved the old directory just before a switch still finds it.
	DefaultGrace = 10 * time.Second
)

// MountMode says whether the files must live in a private mount namespace.
type MountMode int

const (
	MountAuto    MountMode = iota // private when possible, else a tmpfs directory
	MountRequire                  // private, or exec fails
	MountOff                      // always a tmpfs directory
)

// ParseMountMode reads --private-mount: auto, require or off.
func ParseMountMode(s string) (MountMode, error) {
	switch s {
	case "auto":
		return MountAuto, nil
	case "require":
		return MountRequire, nil
	case "off":
		return MountOff, nil
	}
	return 0, fmt.Errorf("--private-mount %q: want auto, require or off", s)
}

// ParseSignal reads --signal: none, or a signal name with or without
// SIG (HUP, SIGUSR1). Signals exec cannot forward sensibly are refused.
func ParseSignal(s string) (syscall.Signal, error) {
	if strings.EqualFold(s, "none") {
		return 0, nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	switch sig {
	case 0:
		return 0, fmt.Errorf("--signal %q: not a signal name (HUP, USR1, ... or none)", s)
	case unix.SIGKILL, unix.SIGSTOP:
		return 0, fmt.Errorf("--signal %q: would stop the command, not reload it", s)
	}
	return sig, nil
}

// Config is what `lanyard-agent exec` runs: the command, and where and
// how its identity comes.
type Config struct {
	Addr         string         // Workload API address (unix://...)
	ID           spiffeid.ID    // the SVID to feed; zero: the first served
	Signal       syscall.Signal // sent to the command after each switch; 0: none
	JWTAudiences []string       // when set, a JWT-SVID for them in LANYARD_JWT_FILE
	Timeout      time.Duration  // for the first SVID (and JWT-SVID); 0: DefaultTimeout
	Grace        time.Duration  // before a replaced generation is removed; 0: DefaultGrace
	Mount        MountMode
	Command      []string // CMD ARGS...
	Log          hclog.Logger

	// The command's standard streams; nil: exec's own.
	Stdin          io.Reader
	Stdout, Stderr io.Writer

	memoryBase string // tests: the tmpfs directory's parent
	source     source // tests: instead of a client for Addr
}

// ErrBadConfig wraps what is wrong with a Config (exit 2).
var ErrBadConfig = errors.New("bad exec config")

func (c Config) withDefaults() (Config, error) {
	if len(c.Command) == 0 || c.Command[0] == "" {
		return c, fmt.Errorf("%w: no command (lanyard-agent exec [flags] -- CMD ARGS...)", ErrBadConfig)
	}
	if c.Timeout < 0 || c.Grace < 0 {
		return c, fmt.Errorf("%w: negative --timeout or grace", ErrBadConfig)
	}
	for _, a := range c.JWTAudiences {
		if a == "" {
			return c, fmt.Errorf("%w: --jwt-audience must not be empty", ErrBadConfig)
		}
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Grace == 0 {
		c.Grace = DefaultGrace
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	return c, nil
}

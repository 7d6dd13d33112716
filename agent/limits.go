package agent

import (
	"fmt"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/workloadapi"
)

// Defaults of the limits block: each far above what a busy host uses and
// far below what a flood needs (README "Limits").
const (
	// A go-spiffe client holds 1-3 streams on its connection (X.509 and
	// JWT bundle watches, a one-shot call); 128 is 40 times that, and
	// 50,000 streams on one connection is what took 1.6 GB.
	DefaultMaxStreamsPerConn = 128
	// A uid running hundreds of workloads holds a few streams each; 4,096
	// bounds one uid to ~120 MiB of streams (~30 KiB each) however many
	// connections it spreads them over.
	DefaultMaxStreamsPerUID = 4096
	// One connection per workload process; few hosts run a thousand
	// processes of one uid that all talk to the agent at once, and 11,000
	// idle connections from one user is what exhausted the descriptors.
	DefaultMaxConnsPerUID = 1024
	// Clients open a call as soon as they connect (go-spiffe dials on the
	// first call); a connection idle this long since accept is holding a
	// descriptor, not asking for an identity.
	DefaultIdleConnTimeout = 10 * time.Second
	// One warning line per uid per interval, with a count.
	DefaultWarningInterval = 10 * time.Second
)

// LimitsConfig is the limits block of the agent config.
type LimitsConfig struct {
	MaxStreamsPerConn int
	MaxStreamsPerUID  int
	MaxConnsPerUID    int
	// MaxConns is 0 unless set: the agent derives it at start from
	// RLIMIT_NOFILE (workloadapi.DefaultMaxConns).
	MaxConns        int
	IdleConnTimeout time.Duration
	WarningInterval time.Duration
}

// DefaultLimits is the limits block when the file has none.
func DefaultLimits() LimitsConfig {
	return LimitsConfig{
		MaxStreamsPerConn: DefaultMaxStreamsPerConn,
		MaxStreamsPerUID:  DefaultMaxStreamsPerUID,
		MaxConnsPerUID:    DefaultMaxConnsPerUID,
		IdleConnTimeout:   DefaultIdleConnTimeout,
		WarningInterval:   DefaultWarningInterval,
	}
}

var agentLimitsSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "max_streams_per_connection"},
		{Name: "max_streams_per_uid"},
		{Name: "max_connections_per_uid"},
		{Name: "max_connections"},
		{Name: "idle_connection_timeout"},
		{Name: "warning_interval"},
	},
}

// decodeLimits reads the optional limits block; absent keys keep their
// defaults.
func decodeLimits(blocks hcl.Blocks, out *LimitsConfig) hcl.Diagnostics {
	*out = DefaultLimits()
	content, diags := hclconf.OneBlock(blocks, agentLimitsSchema)
	if content == nil {
		return diags
	}
	f := hclconf.Fields{Content: content, Diags: diags}
	f.Int("max_streams_per_connection", &out.MaxStreamsPerConn, 1, maxLimit)
	f.Int("max_streams_per_uid", &out.MaxStreamsPerUID, 1, maxLimit)
	f.Int("max_connections_per_uid", &out.MaxConnsPerUID, 1, maxLimit)
	f.Int("max_connections", &out.MaxConns, 1, maxLimit)
	f.Duration("idle_connection_timeout", &out.IdleConnTimeout, 100*time.Millisecond)
	f.Duration("warning_interval", &out.WarningInterval, time.Second)
	return f.Diags
}

// maxLimit keeps a count within an int32, which every cap fits in.
const maxLimit = 1 << 30

// workloadLimits turns the config into the server's limits, deriving the
// total connection cap from RLIMIT_NOFILE when it is not set. A set value
// that the descriptor limit cannot carry is an error: the agent would run
// out of descriptors before the cap protects it.
func (c LimitsConfig) workloadLimits() (workloadapi.Limits, error) {
	derived, err := workloadapi.DefaultMaxConns()
	if err != nil {
		return workloadapi.Limits{}, err
	}
	total := c.MaxConns
	if total == 0 {
		total = derived
	} else if total > derived {
		return workloadapi.Limits{}, fmt.Errorf("limits: max_connections = %d needs more file descriptors than RLIMIT_NOFILE allows (at most %d connections at 2 descriptors each); raise LimitNOFILE or lower max_connections", total, derived)
	}
	return workloadapi.Limits{
		MaxStreamsPerConn: c.MaxStreamsPerConn,
		MaxStreamsPerUID:  c.MaxStreamsPerUID,
		MaxConnsPerUID:    c.MaxConnsPerUID,
		MaxConns:          total,
		IdleTimeout:       c.IdleConnTimeout,
		WarnInterval:      c.WarningInterval,
	}, nil
}

// exhaustionReasons renders the limits callers reached, for status.
func exhaustionReasons(ex []workloadapi.Exhaustion, now time.Time) []string {
	var out []string
	for _, e := range ex {
		when := "now"
		if !e.Now {
			when = now.Sub(e.Last).Round(time.Second).String() + " ago"
		}
		switch {
		case e.Limit == workloadapi.LimitAccept:
			out = append(out, fmt.Sprintf("Workload API accept failing (%s, %s)", e.Error, when))
		case e.UID < 0:
			out = append(out, fmt.Sprintf("Workload API at its %s cap of %d (%s)", e.Limit, e.Cap, when))
		default:
			out = append(out, fmt.Sprintf("uid %d at its %s cap of %d (%s)", e.UID, e.Limit, e.Cap, when))
		}
	}
	return out
}

package execfeed

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// source is what exec needs of the Workload API; go-spiffe's
// *workloadapi.Client is one.
type source interface {
	WatchX509Context(ctx context.Context, w workloadapi.X509ContextWatcher) error
	FetchJWTSVID(ctx context.Context, params jwtsvid.Params) (*jwtsvid.SVID, error)
}

// rewatchDelay is the pause before watching again once go-spiffe's own
// retrying watch gave up (it does on InvalidArgument).
const rewatchDelay = 5 * time.Second

// x509Watch keeps the latest X.509 context the Workload API pushed, and
// the last error, for the supervisor's loop; changed has room for one
// wake-up, so a burst of pushes costs one switch.
type x509Watch struct {
	log     hclog.Logger
	ctx     context.Context
	changed chan struct{}

	mu     sync.Mutex
	latest *workloadapi.X509Context
	err    error
}

func newX509Watch(ctx context.Context, log hclog.Logger) *x509Watch {
	return &x509Watch{ctx: ctx, log: log, changed: make(chan struct{}, 1)}
}

// run watches until ctx ends. go-spiffe retries a broken stream with
// backoff and reports each failure to OnX509ContextWatchError.
func (w *x509Watch) run(src source) {
	for {
		err := src.WatchX509Context(w.ctx, w)
		if w.ctx.Err() != nil {
			return
		}
		w.OnX509ContextWatchError(err)
		select {
		case <-w.ctx.Done():
			return
		case <-time.After(rewatchDelay):
		}
	}
}

func (w *x509Watch) OnX509ContextUpdate(c *workloadapi.X509Context) {
	w.mu.Lock()
	w.latest, w.err = c, nil
	w.mu.Unlock()
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// OnX509ContextWatchError logs a broken stream: the child keeps running
// with the last files while the client retries.
func (w *x509Watch) OnX509ContextWatchError(err error) {
	if w.ctx.Err() != nil {
		return
	}
	w.mu.Lock()
	w.err = err
	w.mu.Unlock()
	w.log.Warn("workload api stream broken; retrying", "error", err)
}

func (w *x509Watch) get() (*workloadapi.X509Context, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.latest, w.err
}

// errNoSVID is why a context that came holds nothing exec can use.
var errNoSVID = errors.New("no usable X.509-SVID")

// pick chooses the SVID to feed, id's or else the first, and its trust
// domain's bundle.
func pick(c *workloadapi.X509Context, id spiffeid.ID, now time.Time) (*x509svid.SVID, *x509bundle.Bundle, error) {
	if c == nil || len(c.SVIDs) == 0 {
		return nil, nil, fmt.Errorf("%w: the Workload API served none", errNoSVID)
	}
	svid := c.SVIDs[0]
	if !id.IsZero() {
		i := slices.IndexFunc(c.SVIDs, func(s *x509svid.SVID) bool { return s.ID == id })
		if i < 0 {
			var ids []string
			for _, s := range c.SVIDs {
				ids = append(ids, s.ID.String())
			}
			return nil, nil, fmt.Errorf("%w: the Workload API serves none for %s (it serves %v)", errNoSVID, id, ids)
		}
		svid = c.SVIDs[i]
	}
	if leaf := svid.Certificates[0]; !now.Before(leaf.NotAfter) {
		return nil, nil, fmt.Errorf("%w: the X.509-SVID of %s (serial %s) expired at %s", errNoSVID, svid.ID, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	b, ok := c.Bundles.Get(svid.ID.TrustDomain())
	if !ok {
		return nil, nil, fmt.Errorf("%w: no bundle for trust domain %s", errNoSVID, svid.ID.TrustDomain())
	}
	return svid, b, nil
}

// jwtResult is one JWT-SVID fetch: a token, or why there is none.
type jwtResult struct {
	svid *jwtsvid.SVID
	err  error
}

// JWT fetch bounds: each attempt, and the pause between failed ones.
const (
	jwtFetchTimeout = 10 * time.Second
	jwtRetryMin     = time.Second
	jwtRetryMax     = 30 * time.Second
)

// fetchJWTs fetches a JWT-SVID for params, sends it on out, and fetches
// the next one at half the token's remaining life, until ctx ends.
// Failures go to out too (before the child starts they explain a
// timeout), and are retried with capped doubling pauses.
func fetchJWTs(ctx context.Context, src source, params jwtsvid.Params, out chan<- jwtResult, log hclog.Logger) {
	retry := jwtRetryMin
	for {
		fctx, cancel := context.WithTimeout(ctx, jwtFetchTimeout)
		s, err := src.FetchJWTSVID(fctx, params)
		cancel()
		if ctx.Err() != nil {
			return
		}
		var wait time.Duration
		if err != nil {
			log.Warn("jwt-svid fetch failed; retrying", "error", err, "retry_in", retry)
			wait, retry = retry, min(2*retry, jwtRetryMax)
		} else {
			retry = jwtRetryMin
			wait = max(time.Until(s.Expiry)/2, jwtRetryMin)
		}
		select {
		case out <- jwtResult{svid: s, err: err}:
		case <-ctx.Done():
			return
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
	}
}

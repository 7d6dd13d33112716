package workloadapi

import (
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// warnLimiter rate-limits warnings per uid. Connect-and-cancel churn from
// one user wrote 30,000 lines a minute; now the first warning of a uid in
// an interval is logged at once, and the others become one line with
// their count when the interval ends. Which uid keeps failing stays
// visible; how often is a count, not a flood.
type warnLimiter struct {
	log      hclog.Logger
	interval time.Duration

	mu   sync.Mutex
	uids map[uint32]*warnWindow
}

// warnWindow is one uid's current interval.
type warnWindow struct {
	suppressed int
	lastMsg    string
}

// unknownUID counts warnings about callers the kernel named no uid for
// (a failed accept, a connection that could not be identified).
const unknownUID = ^uint32(0)

func newWarnLimiter(log hclog.Logger, interval time.Duration) *warnLimiter {
	return &warnLimiter{log: log, interval: interval, uids: map[uint32]*warnWindow{}}
}

// Warn logs msg with kv for uid, unless uid already had a warning in the
// current interval; then it is counted.
func (w *warnLimiter) Warn(uid uint32, msg string, kv ...any) {
	if w == nil {
		return
	}
	if w.interval <= 0 {
		w.log.Warn(msg, kv...)
		return
	}
	w.mu.Lock()
	if win, ok := w.uids[uid]; ok {
		win.suppressed++
		win.lastMsg = msg
		w.mu.Unlock()
		return
	}
	w.uids[uid] = &warnWindow{}
	w.mu.Unlock()
	w.log.Warn(msg, kv...)
	time.AfterFunc(w.interval, func() { w.flush(uid) })
}

// flush ends uid's interval. If it suppressed warnings it logs their
// count and starts another interval, so a steady flood costs one line per
// interval; a quiet interval forgets the uid.
func (w *warnLimiter) flush(uid uint32) {
	w.mu.Lock()
	win := w.uids[uid]
	if win == nil || win.suppressed == 0 {
		delete(w.uids, uid)
		w.mu.Unlock()
		return
	}
	n, last := win.suppressed, win.lastMsg
	win.suppressed = 0
	w.mu.Unlock()
	w.log.Warn("warnings suppressed", "uid", uid, "count", n, "last", last, "interval", w.interval.String())
	time.AfterFunc(w.interval, func() { w.flush(uid) })
}

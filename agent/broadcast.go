package agent

import "sync"

// broadcast wakes every goroutine waiting on it, once per notify: a
// channel closed and replaced. The cache wakes its streams with one, the
// signer connection announces a new connection with one, and the trust
// file wakes the retry loops with one. The zero value is ready to use.
type broadcast struct {
	mu sync.Mutex
	ch chan struct{}
}

// C returns a channel closed at the next notify.
func (b *broadcast) C() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

// notify closes the channel C returned and starts a new one.
func (b *broadcast) notify() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
	}
	b.ch = make(chan struct{})
}

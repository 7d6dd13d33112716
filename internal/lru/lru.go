// Package lru is a bounded map that forgets the least recently used key
// first: the agent's JWT token cache and the attestor's exe-hash cache are
// both one, and a cache a caller can fill must not grow without bound.
package lru

import "container/list"

// Cache maps keys to values and holds at most Max of them. It is not safe
// for concurrent use: its owners guard it with the lock that also guards
// what they keep beside it.
type Cache[K comparable, V any] struct {
	max   int
	byKey map[K]*list.Element // of *item[K, V]
	order list.List           // front = most recently used
}

type item[K comparable, V any] struct {
	key K
	val V
}

// New returns an empty cache that holds at most limit entries (at least 1).
func New[K comparable, V any](limit int) *Cache[K, V] {
	return &Cache[K, V]{max: max(limit, 1), byKey: make(map[K]*list.Element)}
}

// Get returns the value of k and marks it recently used.
func (c *Cache[K, V]) Get(k K) (V, bool) {
	el, ok := c.byKey[k]
	if !ok {
		var zero V
		return zero, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*item[K, V]).val, true
}

// Add sets the value of k, marks it recently used, and evicts the least
// recently used keys past the bound.
func (c *Cache[K, V]) Add(k K, v V) {
	if el, ok := c.byKey[k]; ok {
		el.Value.(*item[K, V]).val = v
		c.order.MoveToFront(el)
		return
	}
	c.byKey[k] = c.order.PushFront(&item[K, V]{key: k, val: v})
	for c.order.Len() > c.max {
		c.remove(c.order.Back())
	}
}

// Remove forgets k.
func (c *Cache[K, V]) Remove(k K) {
	if el, ok := c.byKey[k]; ok {
		c.remove(el)
	}
}

// DeleteFunc forgets every key for which drop returns true.
func (c *Cache[K, V]) DeleteFunc(drop func(K, V) bool) {
	for el := c.order.Front(); el != nil; {
		next := el.Next()
		if it := el.Value.(*item[K, V]); drop(it.key, it.val) {
			c.remove(el)
		}
		el = next
	}
}

// Len reports how many keys the cache holds.
func (c *Cache[K, V]) Len() int { return c.order.Len() }

func (c *Cache[K, V]) remove(el *list.Element) {
	c.order.Remove(el)
	delete(c.byKey, el.Value.(*item[K, V]).key)
}

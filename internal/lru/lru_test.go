package lru

import (
	"slices"
	"testing"
)

func keys(c *Cache[string, int]) []string {
	var out []string
	for el := c.order.Front(); el != nil; el = el.Next() {
		out = append(out, el.Value.(*item[string, int]).key)
	}
	return out
}

func TestCache(t *testing.T) {
	tests := []struct {
		name string
		ops  func(c *Cache[string, int])
		want []string // most recently used first
	}{
		{"evicts the least recently added", func(c *Cache[string, int]) {
			c.Add("a", 1)
			c.Add("b", 2)
			c.Add("c", 3)
			c.Add("d", 4)
		}, []string{"d", "c", "b"}},
		{"a get keeps a key", func(c *Cache[string, int]) {
			c.Add("a", 1)
			c.Add("b", 2)
			c.Add("c", 3)
			c.Get("a")
			c.Add("d", 4)
		}, []string{"d", "a", "c"}},
		{"re-adding replaces and keeps", func(c *Cache[string, int]) {
			c.Add("a", 1)
			c.Add("b", 2)
			c.Add("a", 10)
			c.Add("c", 3)
			c.Add("d", 4)
		}, []string{"d", "c", "a"}},
		{"remove and delete func", func(c *Cache[string, int]) {
			c.Add("a", 1)
			c.Add("b", 2)
			c.Add("c", 3)
			c.Remove("b")
			c.Remove("nothing")
			c.DeleteFunc(func(_ string, v int) bool { return v == 3 })
		}, []string{"a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := New[string, int](3)
			tt.ops(c)
			if got := keys(c); !slices.Equal(got, tt.want) {
				t.Errorf("keys %v, want %v", got, tt.want)
			}
			if c.Len() != len(tt.want) {
				t.Errorf("Len %d, want %d", c.Len(), len(tt.want))
			}
			for _, k := range tt.want {
				if _, ok := c.Get(k); !ok {
					t.Errorf("Get(%q) missing", k)
				}
			}
		})
	}
	c := New[string, int](2)
	c.Add("a", 1)
	c.Add("a", 5)
	if v, ok := c.Get("a"); !ok || v != 5 {
		t.Errorf("Get(a) = %d, %v, want the replaced value 5", v, ok)
	}
}

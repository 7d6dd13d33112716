package policy

import (
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bounds of a workload's actions block. An action token is a
// credential for one step of an automation: seconds to minutes, never
// longer, or it is just another long-lived bearer token.
const (
	MinActionTTL = time.Second
	MaxActionTTL = 5 * time.Minute
	// maxActionNames and maxActionNameBytes keep an entry (and every
	// Sync message carrying it) small.
	maxActionNames     = 256
	maxActionNameBytes = 256
)

// ActionPath is the path element between an entry's SPIFFE ID and an
// action name: an action identity is <spiffe_id>/action/<name>.
const ActionPath = "/action/"

// Actions is a workload's actions block: the single-use action
// identities its processes may ask for, and their lifetime.
type Actions struct {
	TTL time.Duration
	// Names are patterns, in file order, without duplicates: path
	// segments of letters, digits, '.', '-' and '_', separated by '/';
	// a segment "*" matches any one segment.
	Names []string
}

var actionsSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "ttl", Required: true},
		{Name: "names", Required: true},
	},
}

// Allows reports whether action (a literal name, no "*") matches one of
// the names.
func (a *Actions) Allows(action string) bool {
	if a == nil || CheckActionName(action, false) != nil {
		return false
	}
	got := strings.Split(action, "/")
	for _, n := range a.Names {
		pat := strings.Split(n, "/")
		if len(pat) != len(got) {
			continue
		}
		match := true
		for i := range pat {
			if pat[i] != "*" && pat[i] != got[i] {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}

// ActionID is the SPIFFE ID of action for the workload:
// <spiffe_id>/action/<action>.
func (w Workload) ActionID(action string) (spiffeid.ID, error) {
	id, err := spiffeid.FromPath(w.SPIFFEID.TrustDomain(), w.SPIFFEID.Path()+ActionPath+action)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("action %q: %w", action, err)
	}
	return id, nil
}

// CheckActionName validates an action name, or with wildcard a pattern
// whose segments may be "*".
func CheckActionName(name string, wildcard bool) error {
	switch {
	case name == "":
		return fmt.Errorf("empty name")
	case len(name) > maxActionNameBytes:
		return fmt.Errorf("%d bytes (limit %d)", len(name), maxActionNameBytes)
	}
	for i, seg := range strings.Split(name, "/") {
		switch {
		case seg == "":
			return fmt.Errorf("segment %d is empty (no leading, trailing or doubled '/')", i+1)
		case seg == "*" && wildcard:
			continue
		case seg == "." || seg == "..":
			return fmt.Errorf("segment %d is %q", i+1, seg)
		}
		if j := strings.IndexFunc(seg, func(r rune) bool {
			return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || strings.ContainsRune("._-", r))
		}); j >= 0 {
			if wildcard {
				return fmt.Errorf("segment %d %q: use letters, digits, '.', '-' and '_', or exactly \"*\" for any one segment", i+1, seg)
			}
			return fmt.Errorf("segment %d %q: use letters, digits, '.', '-' and '_'", i+1, seg)
		}
	}
	return nil
}

// decodeActions decodes a workload's actions block (at most one).
func decodeActions(blocks hcl.Blocks, w Workload) (*Actions, hcl.Diagnostics) {
	content, diags := hclconf.OneBlock(blocks, actionsSchema)
	if content == nil {
		return nil, diags
	}
	a := &Actions{}
	if attr, ok := content.Attributes["ttl"]; ok {
		ttl, d := hclconf.Duration(attr, MinActionTTL)
		diags = append(diags, d...)
		rng := attr.Expr.Range()
		switch {
		case d.HasErrors():
		case ttl > MaxActionTTL:
			diags = append(diags, hclconf.Errorf(rng, "actions: ttl: %s is above the maximum of %s: an action token is for one step", ttl, MaxActionTTL))
		case ttl%time.Second != 0:
			diags = append(diags, hclconf.Errorf(rng, "actions: ttl: %s is not a whole number of seconds", ttl))
		default:
			a.TTL = ttl
		}
	}
	if attr, ok := content.Attributes["names"]; ok {
		items, d := hclconf.StringList(attr)
		diags = append(diags, d...)
		if len(items) == 0 && !d.HasErrors() {
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "actions: names: at least one name is required"))
		}
		if len(items) > maxActionNames {
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "actions: names: %d names (limit %d)", len(items), maxActionNames))
			items = nil
		}
		seen := map[string]int{}
		for _, it := range items {
			if err := CheckActionName(it.Value, true); err != nil {
				diags = append(diags, hclconf.Errorf(it.Range, "actions: names: %q: %v", it.Value, err))
				continue
			}
			if first, dup := seen[it.Value]; dup {
				diags = append(diags, hclconf.Errorf(it.Range, "actions: names: %q is listed twice (first at line %d)", it.Value, first))
				continue
			}
			seen[it.Value] = it.Range.Start.Line
			// "*" stands for a segment; any valid one shows whether the
			// ID the pattern can produce is a SPIFFE ID.
			if !w.SPIFFEID.IsZero() {
				if _, err := w.ActionID(instance(it.Value)); err != nil {
					diags = append(diags, hclconf.Errorf(it.Range, "actions: names: %q: %v", it.Value, err))
					continue
				}
			}
			a.Names = append(a.Names, it.Value)
		}
	}
	return a, diags
}

// instance is pattern with each "*" segment replaced by a literal one.
func instance(pattern string) string {
	segs := strings.Split(pattern, "/")
	for i, s := range segs {
		if s == "*" {
			segs[i] = "x"
		}
	}
	return strings.Join(segs, "/")
}

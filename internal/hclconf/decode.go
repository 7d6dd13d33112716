package hclconf

import (
	"fmt"
	"math/big"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/zclconf/go-cty/cty"
)

// Parse parses src as HCL native syntax. When the syntax is broken it
// returns only the syntax errors: decoding a half-parsed body would add
// noise (spurious "missing argument" reports) to the real problem.
func Parse(src []byte, filename string) (hcl.Body, hcl.Diagnostics) {
	f, diags := hclparse.NewParser().ParseHCL(src, filename)
	if diags.HasErrors() {
		return nil, diags
	}
	return f.Body, diags
}

// BaseDir returns the absolute directory of filename: relative paths written
// in a config file are resolved against it, so the meaning of a file does not
// depend on the directory a daemon was started from.
func BaseDir(filename string) string {
	dir := filepath.Dir(filename)
	if abs, err := filepath.Abs(dir); err == nil {
		return abs
	}
	return dir
}

// Resolve returns p made absolute against dir (see BaseDir).
func Resolve(dir, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(dir, p)
}

// Item is one element of a list attribute and where it was written, so a
// problem with one element of a multi-line list names that element's line.
type Item struct {
	Value string
	Range hcl.Range
}

// String decodes attr as a string. Only a string is accepted: HCL would
// silently turn `port = 8443` into "8443", but a config file that says
// `x509_ttl = 60` almost certainly meant something else, so it is an error.
func String(attr *hcl.Attribute) (string, hcl.Diagnostics) {
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() {
		return "", diags
	}
	rng := attr.Expr.Range()
	if d := checkString(attr.Name, v, rng); d != nil {
		return "", hcl.Diagnostics{d}
	}
	return v.AsString(), nil
}

// NonEmptyString is String that also rejects "".
func NonEmptyString(attr *hcl.Attribute) (string, hcl.Diagnostics) {
	s, diags := String(attr)
	if diags.HasErrors() {
		return "", diags
	}
	if strings.TrimSpace(s) == "" {
		return "", hcl.Diagnostics{Errorf(attr.Expr.Range(), "%s: must not be empty", attr.Name)}
	}
	return s, nil
}

// StringList decodes attr as a list of strings, each with its own range.
func StringList(attr *hcl.Attribute) ([]Item, hcl.Diagnostics) {
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() {
		return nil, diags
	}
	rng := attr.Expr.Range()
	switch {
	case !v.IsWhollyKnown():
		return nil, hcl.Diagnostics{Errorf(rng, "%s: value is not known", attr.Name)}
	case v.IsNull():
		return nil, hcl.Diagnostics{Errorf(rng, "%s: must not be null", attr.Name)}
	case !v.Type().IsTupleType() && !v.Type().IsListType() && !v.Type().IsSetType():
		return nil, hcl.Diagnostics{Errorf(rng, "%s: expected a list of strings, got %s", attr.Name, v.Type().FriendlyName())}
	}
	// Element ranges exist only for a literal list; anything else (a for
	// expression, say) is located at the whole attribute.
	elems, ediags := hcl.ExprList(attr.Expr)
	if ediags.HasErrors() || len(elems) != v.LengthInt() {
		elems = nil
	}
	items := make([]Item, 0, v.LengthInt())
	for i, it := 0, v.ElementIterator(); it.Next(); i++ {
		_, ev := it.Element()
		erng := rng
		if elems != nil {
			erng = elems[i].Range()
		}
		if d := checkString(fmt.Sprintf("%s[%d]", attr.Name, i), ev, erng); d != nil {
			diags = append(diags, d)
			continue
		}
		items = append(items, Item{Value: ev.AsString(), Range: erng})
	}
	return items, diags
}

func checkString(name string, v cty.Value, rng hcl.Range) *hcl.Diagnostic {
	switch {
	case !v.IsKnown():
		return Errorf(rng, "%s: value is not known", name)
	case v.IsNull():
		return Errorf(rng, "%s: must not be null", name)
	case !v.Type().Equals(cty.String):
		return Errorf(rng, "%s: expected a string, got %s", name, v.Type().FriendlyName())
	}
	return nil
}

// Duration decodes attr as a Go duration string ("90s", "5m", "1h") of at
// least minimum.
func Duration(attr *hcl.Attribute, minimum time.Duration) (time.Duration, hcl.Diagnostics) {
	s, diags := String(attr)
	if diags.HasErrors() {
		return 0, diags
	}
	rng := attr.Expr.Range()
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, hcl.Diagnostics{Errorf(rng, "%s: invalid duration %q (write it like \"90s\", \"5m\" or \"1h\")", attr.Name, s)}
	}
	if d < minimum {
		return 0, hcl.Diagnostics{Errorf(rng, "%s: %s is below the minimum of %s", attr.Name, s, minimum)}
	}
	return d, nil
}

// Int decodes attr as a whole number from lo to hi. Only a number is
// accepted: a quoted "64" is as likely a mistake as x509_ttl = 60.
func Int(attr *hcl.Attribute, lo, hi int) (int, hcl.Diagnostics) {
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() {
		return 0, diags
	}
	rng := attr.Expr.Range()
	switch {
	case !v.IsWhollyKnown():
		return 0, hcl.Diagnostics{Errorf(rng, "%s: value is not known", attr.Name)}
	case v.IsNull():
		return 0, hcl.Diagnostics{Errorf(rng, "%s: must not be null", attr.Name)}
	case !v.Type().Equals(cty.Number):
		return 0, hcl.Diagnostics{Errorf(rng, "%s: expected a whole number, got %s", attr.Name, v.Type().FriendlyName())}
	}
	bf := v.AsBigFloat()
	n, acc := bf.Int64()
	if acc != big.Exact || n < int64(lo) || n > int64(hi) {
		return 0, hcl.Diagnostics{Errorf(rng, "%s: %s is not a whole number from %d to %d", attr.Name, bf.Text('f', -1), lo, hi)}
	}
	return int(n), nil
}

// OneBlock decodes the first of blocks (all of one type) with schema, and
// reports every further one as an error: blocks such as limits or tpm may
// appear once. It returns nil content when there is no block.
func OneBlock(blocks hcl.Blocks, schema *hcl.BodySchema) (*hcl.BodyContent, hcl.Diagnostics) {
	if len(blocks) == 0 {
		return nil, nil
	}
	var diags hcl.Diagnostics
	for _, b := range blocks[1:] {
		diags = append(diags, Errorf(b.DefRange, "only one %s block is allowed (first at line %d)", b.Type, blocks[0].DefRange.Start.Line))
	}
	content, d := blocks[0].Body.Content(schema)
	return content, append(diags, d...)
}

// OneOf decodes attr as a string that must be one of allowed.
func OneOf(attr *hcl.Attribute, allowed ...string) (string, hcl.Diagnostics) {
	s, diags := String(attr)
	if diags.HasErrors() {
		return "", diags
	}
	if !slices.Contains(allowed, s) {
		return "", hcl.Diagnostics{Errorf(attr.Expr.Range(), "%s: %q is not one of %s", attr.Name, s, strings.Join(allowed, ", "))}
	}
	return s, nil
}

// Path decodes attr as a non-empty file path and resolves it against dir.
func Path(attr *hcl.Attribute, dir string) (string, hcl.Diagnostics) {
	s, diags := NonEmptyString(attr)
	if diags.HasErrors() {
		return "", diags
	}
	return Resolve(dir, s), nil
}

// MaxSocketPath is the longest path a Unix socket can bind: sun_path holds
// 108 bytes including the terminating NUL. Checked in the config so a long
// path is an error with a line number, not a bind failure at start.
const MaxSocketPath = 107

// SocketPath decodes attr as a Unix socket path (Path, at most
// MaxSocketPath bytes).
func SocketPath(attr *hcl.Attribute, dir string) (string, hcl.Diagnostics) {
	p, diags := Path(attr, dir)
	if diags.HasErrors() {
		return "", diags
	}
	if len(p) > MaxSocketPath {
		return "", hcl.Diagnostics{Errorf(attr.Expr.Range(), "%s: %q is %d bytes; a Unix socket path can be at most %d", attr.Name, p, len(p), MaxSocketPath)}
	}
	return p, nil
}

// LogLevel decodes a log_level key: trace, debug, info, warn or error.
func LogLevel(attr *hcl.Attribute) (string, hcl.Diagnostics) {
	return OneOf(attr, "trace", "debug", "info", "warn", "error")
}

// LogFormat decodes a log_format key: text or json.
func LogFormat(attr *hcl.Attribute) (string, hcl.Diagnostics) {
	return OneOf(attr, "text", "json")
}

// HostPort decodes attr as a "host:port" address with a numeric port. An
// address to listen on may leave the host empty (":8443", every address) and
// use port 0 (any free port, for tests); an address to dial may not.
func HostPort(attr *hcl.Attribute, listen bool) (string, hcl.Diagnostics) {
	s, diags := NonEmptyString(attr)
	if diags.HasErrors() {
		return "", diags
	}
	rng := attr.Expr.Range()
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", hcl.Diagnostics{Errorf(rng, "%s: %q is not host:port", attr.Name, s)}
	}
	if host == "" && !listen {
		return "", hcl.Diagnostics{Errorf(rng, "%s: %q has no host", attr.Name, s)}
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && !listen) {
		return "", hcl.Diagnostics{Errorf(rng, "%s: %q: port must be a number from 1 to 65535", attr.Name, s)}
	}
	return s, nil
}

// TrustDomain decodes attr as a trust domain name ("example.org") or its
// SPIFFE ID ("spiffe://example.org").
func TrustDomain(attr *hcl.Attribute) (spiffeid.TrustDomain, hcl.Diagnostics) {
	s, diags := NonEmptyString(attr)
	if diags.HasErrors() {
		return spiffeid.TrustDomain{}, diags
	}
	td, err := spiffeid.TrustDomainFromString(s)
	if err != nil {
		return spiffeid.TrustDomain{}, hcl.Diagnostics{Errorf(attr.Expr.Range(), "%s: %q: %v", attr.Name, s, err)}
	}
	return td, nil
}

// LoopbackAddress decodes attr as a host:port to listen on that only this
// host can reach: a loopback IP (127.0.0.0/8, ::1) or "localhost". Metrics
// and health endpoints have no authentication and metrics name workloads,
// so exposing them beyond the host is refused here rather than trusted to
// a firewall. Port 0 picks a free port (tests).
func LoopbackAddress(attr *hcl.Attribute) (string, hcl.Diagnostics) {
	s, diags := HostPort(attr, true)
	if diags.HasErrors() {
		return "", diags
	}
	host, _, _ := net.SplitHostPort(s)
	if host == "localhost" {
		return s, nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return "", hcl.Diagnostics{Errorf(attr.Expr.Range(), "%s: %q: host must be a loopback address such as 127.0.0.1 or [::1] (the endpoint has no authentication)", attr.Name, s)}
	}
	return s, nil
}

// Fields decodes the optional attributes of one block (its Content, as
// OneBlock returns it) into their destinations, gathering every problem in
// Diags. An attribute that is absent, or does not decode, leaves its
// destination as it was (its default).
type Fields struct {
	Content *hcl.BodyContent
	Diags   hcl.Diagnostics
}

// Int decodes attribute name, when present, as a whole number from lo to
// hi into dst.
func (f *Fields) Int(name string, dst *int, lo, hi int) {
	if a, ok := f.Content.Attributes[name]; ok {
		v, d := Int(a, lo, hi)
		f.Diags = append(f.Diags, d...)
		if !d.HasErrors() {
			*dst = v
		}
	}
}

// Duration decodes attribute name, when present, as a duration of at
// least minimum into dst.
func (f *Fields) Duration(name string, dst *time.Duration, minimum time.Duration) {
	if a, ok := f.Content.Attributes[name]; ok {
		v, d := Duration(a, minimum)
		f.Diags = append(f.Diags, d...)
		if !d.HasErrors() {
			*dst = v
		}
	}
}

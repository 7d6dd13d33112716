// Package policy reads the signer's policy file: which TPMs are known hosts
// (node blocks) and which SPIFFE IDs a process on those hosts may receive
// (workload blocks). Every check a policy can fail happens here, so the
// signer can refuse a bad edit and keep serving the last good policy.
package policy

import (
	"crypto/x509"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
	"github.com/lanyard-dev/lanyard/selector"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults and floors for workload TTLs. The floor keeps renewal (at half
// the lifetime) from turning into a busy loop against the signer.
const (
	DefaultX509TTL = time.Hour
	DefaultJWTTTL  = 5 * time.Minute
	MinTTL         = 10 * time.Second
)

// ReservedPathPrefix is the part of the trust domain that belongs to
// Lanyard's own identities (agent SVIDs are
// spiffe://<td>/lanyard/agent/tpm/<ek>): a workload entry there could hand a
// process an agent's identity, so policy rejects it.
const ReservedPathPrefix = "/lanyard"

// Policy is a validated policy file. It is immutable once returned: callers
// share it between goroutines and must not modify its slices or pools.
type Policy struct {
	Path      string // the file name given to Load or Parse
	Nodes     []Node
	Workloads []Workload
}

// Node is a class of hosts recognised by their TPM: an EK whose SHA-256 (of
// the PKIX public key) is pinned, or whose EK certificate chains to one of
// the manufacturer CAs.
type Node struct {
	Name     string
	EKSHA256 []string // lowercase hex, 64 digits each
	EKCA     []string // absolute paths of the ek_ca files
	// Roots holds the self-signed certificates of the ek_ca files and
	// Intermediates the others; each is nil when there are none.
	Roots, Intermediates *x509.CertPool
}

// Workload is one identity and the conditions to serve it: the agent must
// run on one of Nodes, and the calling process must carry every selector.
type Workload struct {
	Name      string
	SPIFFEID  spiffeid.ID
	Nodes     []string // names of node blocks, as written, without duplicates
	Selectors []string // sorted, without duplicates; never empty
	X509TTL   time.Duration
	JWTTTL    time.Duration
	DNSNames  []string
	Hint      string
	// FederatesWith names the foreign trust domains (SPIFFE federation)
	// whose bundles the workload is given, in file order, never its own.
	// A name need not have a federation block in the signer's config:
	// that is a warning there, not a policy error, so the policy and the
	// config can change in either order.
	FederatesWith []spiffeid.TrustDomain
	// Actions are the single-use action identities the workload may ask
	// for (actions.go); nil when it has no actions block.
	Actions *Actions
}

var fileSchema = &hcl.BodySchema{
	Blocks: []hcl.BlockHeaderSchema{
		{Type: "node", LabelNames: []string{"name"}},
		{Type: "workload", LabelNames: []string{"name"}},
	},
}

var nodeSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "ek_sha256"}, {Name: "ek_ca"}},
}

var workloadSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "spiffe_id", Required: true},
		{Name: "nodes", Required: true},
		{Name: "selectors", Required: true},
		{Name: "x509_ttl"},
		{Name: "jwt_ttl"},
		{Name: "dns_names"},
		{Name: "hint"},
		{Name: "federates_with"},
	},
	Blocks: []hcl.BlockHeaderSchema{{Type: "actions"}},
}

// Load reads and validates the policy file at path, and the ek_ca files it
// names. Problems in the files come back as hclconf.Errors.
func Load(path string, td spiffeid.TrustDomain) (*Policy, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read policy: %w", err)
	}
	return Parse(src, path, td)
}

// Parse validates src as the policy file filename; ek_ca paths are read
// relative to the directory of filename. Every problem found is reported,
// as hclconf.Errors with file and line.
func Parse(src []byte, filename string, td spiffeid.TrustDomain) (*Policy, error) {
	return parse(src, filename, td, readDiskFile)
}

// ParseFiles is Parse for a policy that travelled without its directory (a
// signer tier keeps the policy in etcd): the ek_ca paths, resolved against
// filename's directory as Parse does, are looked up in files, never on this
// host's disk, so every replica loads the same certificates whatever its
// own file system holds. A path missing from files is the same file:line
// error as a missing file. Policy.Nodes[i].EKCA lists the keys to collect.
func ParseFiles(src []byte, filename string, td spiffeid.TrustDomain, files map[string][]byte) (*Policy, error) {
	return parse(src, filename, td, func(path string) ([]byte, error) {
		data, ok := files[path]
		if !ok {
			return nil, fmt.Errorf("cannot read %q: %w", path, syscall.ENOENT)
		}
		if len(data) > maxCAFileSize {
			return nil, fmt.Errorf("%q is larger than %d bytes", path, maxCAFileSize)
		}
		return data, nil
	})
}

// parse is Parse with the way ek_ca files are read left to the caller.
func parse(src []byte, filename string, td spiffeid.TrustDomain, readFile func(path string) ([]byte, error)) (*Policy, error) {
	if td.IsZero() {
		return nil, fmt.Errorf("parse policy %s: no trust domain given", filename)
	}
	body, diags := hclconf.Parse(src, filename)
	if diags.HasErrors() {
		return nil, hclconf.FromDiagnostics(diags).Err()
	}
	content, diags := body.Content(fileSchema)
	dir := hclconf.BaseDir(filename)
	p := &Policy{Path: filename}

	// Nodes first: a workload may name a node defined further down.
	nodeLines := map[string]int{}
	for _, b := range content.Blocks.OfType("node") {
		n, d := decodeNode(b, dir, readFile)
		diags = append(diags, d...)
		if checkName(b, "node", nodeLines, &diags) {
			p.Nodes = append(p.Nodes, n)
		}
	}
	workloadLines := map[string]int{}
	for _, b := range content.Blocks.OfType("workload") {
		w, d := decodeWorkload(b, td, nodeLines)
		diags = append(diags, d...)
		if checkName(b, "workload", workloadLines, &diags) {
			p.Workloads = append(p.Workloads, w)
		}
	}
	if err := hclconf.FromDiagnostics(diags).Err(); err != nil {
		return nil, err
	}
	return p, nil
}

// checkName records the label of b in seen and reports whether it is a
// usable, first-time name. Names travel in logs and node selectors, so they
// are kept to a plain alphabet.
func checkName(b *hcl.Block, kind string, seen map[string]int, diags *hcl.Diagnostics) bool {
	name, rng := b.Labels[0], b.LabelRanges[0]
	if first, dup := seen[name]; dup {
		*diags = append(*diags, hclconf.Errorf(rng, "duplicate %s %q (first defined at line %d)", kind, name, first))
		return false
	}
	// Recorded even when malformed, so references to it don't add a second
	// error for the same mistake.
	seen[name] = b.DefRange.Start.Line
	if name == "" || strings.IndexFunc(name, func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || strings.ContainsRune("._-", r))
	}) >= 0 {
		*diags = append(*diags, hclconf.Errorf(rng, "%s name %q: use letters, digits, '.', '_' and '-'", kind, name))
		return false
	}
	return true
}

func decodeNode(b *hcl.Block, dir string, readFile func(string) ([]byte, error)) (Node, hcl.Diagnostics) {
	n := Node{Name: b.Labels[0]}
	content, diags := b.Body.Content(nodeSchema)
	var bad bool // an attribute with errors already explains itself
	if attr, ok := content.Attributes["ek_sha256"]; ok {
		items, d := hclconf.StringList(attr)
		diags, bad = append(diags, d...), bad || d.HasErrors()
		for _, it := range items {
			h := strings.ToLower(it.Value)
			if !selector.ValidValue(selector.TPMEKSHA256, h) {
				diags, bad = append(diags, hclconf.Errorf(it.Range, "ek_sha256: %q is not a SHA-256 (64 hex digits)", it.Value)), true
				continue
			}
			if !slices.Contains(n.EKSHA256, h) {
				n.EKSHA256 = append(n.EKSHA256, h)
			}
		}
	}
	if attr, ok := content.Attributes["ek_ca"]; ok {
		items, d := hclconf.StringList(attr)
		diags, bad = append(diags, d...), bad || d.HasErrors()
		var roots, inters []*x509.Certificate
		for _, it := range items {
			path := hclconf.Resolve(dir, it.Value)
			r, i, err := readCAFile(path, readFile)
			if err != nil {
				diags, bad = append(diags, hclconf.Errorf(it.Range, "ek_ca: %v", err)), true
				continue
			}
			if !slices.Contains(n.EKCA, path) {
				n.EKCA = append(n.EKCA, path)
			}
			roots, inters = append(roots, r...), append(inters, i...)
		}
		// Chain verification needs an anchor: intermediates alone would
		// silently accept no TPM at all.
		if len(roots) == 0 && len(inters) > 0 {
			diags, bad = append(diags, hclconf.Errorf(attr.Expr.Range(), "ek_ca: no self-signed root certificate among the files; an EK certificate must chain to one")), true
		}
		n.Roots, n.Intermediates = certPool(roots), certPool(inters)
	}
	if !bad && !diags.HasErrors() && len(n.EKSHA256) == 0 && len(n.EKCA) == 0 {
		diags = append(diags, hclconf.Errorf(b.DefRange, "node %q: set ek_sha256 or ek_ca, or it matches no TPM", n.Name))
	}
	return n, diags
}

func decodeWorkload(b *hcl.Block, td spiffeid.TrustDomain, nodes map[string]int) (Workload, hcl.Diagnostics) {
	w := Workload{Name: b.Labels[0], X509TTL: DefaultX509TTL, JWTTTL: DefaultJWTTTL}
	content, diags := b.Body.Content(workloadSchema)
	if attr, ok := content.Attributes["spiffe_id"]; ok {
		id, d := decodeSPIFFEID(attr, td)
		w.SPIFFEID, diags = id, append(diags, d...)
	}
	if attr, ok := content.Attributes["nodes"]; ok {
		items, d := hclconf.StringList(attr)
		diags = append(diags, d...)
		if len(items) == 0 && !d.HasErrors() {
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "nodes: name at least one node block"))
		}
		for _, it := range items {
			if _, ok := nodes[it.Value]; !ok {
				diags = append(diags, hclconf.Errorf(it.Range, "nodes: no node block named %q", it.Value))
				continue
			}
			if !slices.Contains(w.Nodes, it.Value) {
				w.Nodes = append(w.Nodes, it.Value)
			}
		}
	}
	if attr, ok := content.Attributes["selectors"]; ok {
		items, d := hclconf.StringList(attr)
		diags = append(diags, d...)
		// No selectors would match every process on the host.
		if len(items) == 0 && !d.HasErrors() {
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "selectors: at least one selector is required"))
		}
		for _, it := range items {
			if err := selector.Validate(it.Value); err != nil {
				diags = append(diags, hclconf.Errorf(it.Range, "selectors: %v", err))
				continue
			}
			w.Selectors = append(w.Selectors, it.Value)
		}
		slices.Sort(w.Selectors)
		w.Selectors = slices.Compact(w.Selectors)
	}
	if attr, ok := content.Attributes["x509_ttl"]; ok {
		ttl, d := hclconf.Duration(attr, MinTTL)
		diags = append(diags, d...)
		w.X509TTL = ttl
	}
	if attr, ok := content.Attributes["jwt_ttl"]; ok {
		ttl, d := hclconf.Duration(attr, MinTTL)
		diags = append(diags, d...)
		w.JWTTTL = ttl
	}
	if attr, ok := content.Attributes["dns_names"]; ok {
		items, d := hclconf.StringList(attr)
		diags = append(diags, d...)
		for _, it := range items {
			if err := validateDNSName(it.Value); err != nil {
				diags = append(diags, hclconf.Errorf(it.Range, "dns_names: %q: %v", it.Value, err))
				continue
			}
			w.DNSNames = append(w.DNSNames, it.Value)
		}
	}
	if attr, ok := content.Attributes["hint"]; ok {
		hint, d := hclconf.String(attr)
		diags = append(diags, d...)
		w.Hint = hint
	}
	if attr, ok := content.Attributes["federates_with"]; ok {
		var d hcl.Diagnostics
		w.FederatesWith, d = decodeFederatesWith(attr, td)
		diags = append(diags, d...)
	}
	actions, d := decodeActions(content.Blocks.OfType("actions"), w)
	w.Actions, diags = actions, append(diags, d...)
	return w, diags
}

// decodeFederatesWith decodes federates_with: trust domain names (not
// SPIFFE IDs: the agent and the status name them so), not td, no name
// twice.
func decodeFederatesWith(attr *hcl.Attribute, td spiffeid.TrustDomain) ([]spiffeid.TrustDomain, hcl.Diagnostics) {
	items, diags := hclconf.StringList(attr)
	var out []spiffeid.TrustDomain
	seen := map[string]int{}
	for _, it := range items {
		fd, err := spiffeid.TrustDomainFromString(it.Value)
		switch {
		case err != nil:
			diags = append(diags, hclconf.Errorf(it.Range, "federates_with: %q: %v", it.Value, err))
			continue
		case fd.Name() != it.Value:
			diags = append(diags, hclconf.Errorf(it.Range, "federates_with: %q: write the trust domain name (%q)", it.Value, fd.Name()))
			continue
		case fd == td:
			diags = append(diags, hclconf.Errorf(it.Range, "federates_with: %q is this policy's own trust domain", it.Value))
			continue
		}
		if first, dup := seen[it.Value]; dup {
			diags = append(diags, hclconf.Errorf(it.Range, "federates_with: %q is listed twice (first at line %d)", it.Value, first))
			continue
		}
		seen[it.Value] = it.Range.Start.Line
		out = append(out, fd)
	}
	return out, diags
}

func decodeSPIFFEID(attr *hcl.Attribute, td spiffeid.TrustDomain) (spiffeid.ID, hcl.Diagnostics) {
	s, diags := hclconf.String(attr)
	if diags.HasErrors() {
		return spiffeid.ID{}, diags
	}
	rng := attr.Expr.Range()
	id, err := spiffeid.FromString(s)
	switch {
	case err != nil:
		return spiffeid.ID{}, hcl.Diagnostics{hclconf.Errorf(rng, "spiffe_id: %q: %v", s, err)}
	case !id.MemberOf(td):
		return spiffeid.ID{}, hcl.Diagnostics{hclconf.Errorf(rng, "spiffe_id: %q is not in trust domain %q", s, td.Name())}
	case id.Path() == "":
		return spiffeid.ID{}, hcl.Diagnostics{hclconf.Errorf(rng, "spiffe_id: %q has no path; a workload ID needs one", s)}
	case id.Path() == ReservedPathPrefix || strings.HasPrefix(id.Path(), ReservedPathPrefix+"/"):
		return spiffeid.ID{}, hcl.Diagnostics{hclconf.Errorf(rng, "spiffe_id: %q: paths under %s are reserved for Lanyard's own identities", s, ReservedPathPrefix)}
	}
	return id, nil
}

// WorkloadsForNodes returns the workloads that may be served on a host that
// matched any of the named node blocks, in file order.
func (p *Policy) WorkloadsForNodes(names []string) []Workload {
	var out []Workload
	for _, w := range p.Workloads {
		if slices.ContainsFunc(w.Nodes, func(n string) bool { return slices.Contains(names, n) }) {
			out = append(out, w)
		}
	}
	return out
}

// NodesWithEK returns the names of the node blocks that pin ekSHA256 (hex,
// either case). Matching by EK certificate chain is the verifier's job,
// with each Node's Roots and Intermediates.
func (p *Policy) NodesWithEK(ekSHA256 string) []string {
	h := strings.ToLower(ekSHA256)
	var out []string
	for _, n := range p.Nodes {
		if slices.Contains(n.EKSHA256, h) {
			out = append(out, n.Name)
		}
	}
	return out
}

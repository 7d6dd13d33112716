// Package tpmconf decodes the tpm block that the agent's and the signer's
// config files share: where the TPM is (device or socket) and, for the
// agent, how it is watched. One decoder, so the block means the same thing
// in both files.
package tpmconf

import (
	"slices"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

// Bounds of the tpm block's tuning fields: a probe or a reopen attempt
// more often than every 100 ms would only load the TPM, and one rarer
// than every 10 minutes leaves a lost TPM unnoticed or unused too long.
const (
	MinInterval = 100 * time.Millisecond
	MaxInterval = 10 * time.Minute
)

// Options says what a file's tpm block may hold.
type Options struct {
	// Required makes a missing block an error (the agent cannot run
	// without a TPM; the signer can, with memory keys).
	Required bool
	// Tuning allows probe_interval and reopen_max_interval, which only a
	// long-lived TPM holder (the agent) reads.
	Tuning bool
}

var (
	schema       = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "device"}, {Name: "socket"}}}
	tuningSchema = &hcl.BodySchema{Attributes: append(slices.Clone(schema.Attributes), hcl.AttributeSchema{Name: "probe_interval"}, hcl.AttributeSchema{Name: "reopen_max_interval"})}
)

// Decode reads blocks, the file's tpm blocks, into tpm: at most one block
// naming exactly one of device or socket (guessing between a hardware TPM
// and a software one is not Lanyard's call). file is the whole file's
// body, for the position of a missing block; dir resolves relative paths.
// It reports whether a block was present.
func Decode(blocks hcl.Blocks, file hcl.Body, dir string, opts Options, tpm *node.TPMConfig) (bool, hcl.Diagnostics) {
	if len(blocks) == 0 {
		// A malformed tpm block (with a label, say) is dropped by the
		// schema and already reported; don't call it missing as well.
		if sb, ok := file.(*hclsyntax.Body); ok && slices.ContainsFunc(sb.Blocks, func(b *hclsyntax.Block) bool { return b.Type == "tpm" }) {
			return true, nil
		}
		if !opts.Required {
			return false, nil
		}
		return false, hcl.Diagnostics{hclconf.Errorf(file.MissingItemRange(), `a tpm block is required: tpm { device = "/dev/tpmrm0" } or tpm { socket = "/path/to/swtpm.sock" }`)}
	}
	var diags hcl.Diagnostics
	for _, b := range blocks[1:] {
		diags = append(diags, hclconf.Errorf(b.DefRange, "only one tpm block is allowed (first at line %d)", blocks[0].DefRange.Start.Line))
	}
	b := blocks[0]
	s := schema
	if opts.Tuning {
		s = tuningSchema
	}
	content, d := b.Body.Content(s)
	diags = append(diags, d...)
	dev, hasDev := content.Attributes["device"]
	sock, hasSock := content.Attributes["socket"]
	switch {
	case hasDev && hasSock:
		diags = append(diags, hclconf.Errorf(sock.Range, "tpm: set device or socket, not both"))
	case hasDev:
		tpm.Device, d = hclconf.Path(dev, dir)
		diags = append(diags, d...)
	case hasSock:
		tpm.Socket, d = hclconf.SocketPath(sock, dir)
		diags = append(diags, d...)
	default:
		diags = append(diags, hclconf.Errorf(b.DefRange, "tpm: set device (e.g. /dev/tpmrm0) or socket"))
	}
	for _, f := range []struct {
		name string
		dst  *time.Duration
	}{{"probe_interval", &tpm.ProbeInterval}, {"reopen_max_interval", &tpm.ReopenMax}} {
		if attr, ok := content.Attributes[f.name]; ok {
			d, dd := hclconf.Duration(attr, MinInterval)
			diags = append(diags, dd...)
			switch {
			case dd.HasErrors():
			case d > MaxInterval:
				diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "%s: %s is over the maximum of %s", f.name, d, MaxInterval))
			default:
				*f.dst = d
			}
		}
	}
	return true, diags
}

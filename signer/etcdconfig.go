package signer

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

// EtcdConfig is the etcd block: where a tier of replicas keeps its shared
// state. Its TLS files are etcd's own client credentials (which etcd
// users may read and write Lanyard's prefix), not a Lanyard secret:
// nothing in etcd is secret, and the worst a thief of that key can do is
// what `policy apply` and `node revoke` can.
type EtcdConfig struct {
	Endpoints []string // client URLs
	Prefix    string   // "/lanyard/<trust domain>" or another absolute key path
	// CAFile verifies the etcd servers; CertFile and KeyFile are the
	// client's certificate and key. All empty: plain http (tests, loopback).
	CAFile, CertFile, KeyFile string
}

var etcdSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "endpoints", Required: true}, {Name: "prefix", Required: true}},
	Blocks:     []hcl.BlockHeaderSchema{{Type: "tls"}},
}

var etcdTLSSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "ca_file"}, {Name: "cert_file"}, {Name: "key_file"}},
}

// prefixRE is an etcd key prefix the tier may own: absolute, plain path
// segments, no trailing slash (the store adds "/policy", "/replicas/…").
var prefixRE = regexp.MustCompile(`^(/[A-Za-z0-9._-]+)+$`)

// replicaNameRE: a replica's name is a key segment and a log value.
var replicaNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// decodeEtcd decodes the etcd block, if any, into cfg.Etcd.
func decodeEtcd(blocks hcl.Blocks, dir string, cfg *Config) hcl.Diagnostics {
	content, diags := hclconf.OneBlock(blocks, etcdSchema)
	if content == nil {
		return diags
	}
	e := &EtcdConfig{}
	if attr, ok := content.Attributes["endpoints"]; ok {
		items, d := hclconf.StringList(attr)
		diags = append(diags, d...)
		if !d.HasErrors() && len(items) == 0 {
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "endpoints: empty: name at least one etcd client URL, e.g. \"https://etcd-1:2379\""))
		}
		for _, it := range items {
			u, err := url.Parse(it.Value)
			switch {
			case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Port() == "" || (u.Path != "" && u.Path != "/"):
				diags = append(diags, hclconf.Errorf(it.Range, "endpoints: %q is not an etcd client URL (http:// or https://host:port)", it.Value))
			case slices.Contains(e.Endpoints, it.Value):
				diags = append(diags, hclconf.Errorf(it.Range, "endpoints: %q is listed twice", it.Value))
			default:
				e.Endpoints = append(e.Endpoints, it.Value)
			}
		}
	}
	if attr, ok := content.Attributes["prefix"]; ok {
		p, d := hclconf.NonEmptyString(attr)
		diags = append(diags, d...)
		if !d.HasErrors() && !prefixRE.MatchString(p) {
			diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "prefix: %q is not an absolute key path without a trailing slash, e.g. \"/lanyard/example.org\"", p))
		}
		e.Prefix = p
	}
	tlsContent, d := hclconf.OneBlock(content.Blocks.OfType("tls"), etcdTLSSchema)
	diags = append(diags, d...)
	if tlsContent != nil {
		for name, dst := range map[string]*string{"ca_file": &e.CAFile, "cert_file": &e.CertFile, "key_file": &e.KeyFile} {
			if attr, ok := tlsContent.Attributes[name]; ok {
				var d hcl.Diagnostics
				*dst, d = hclconf.Path(attr, dir)
				diags = append(diags, d...)
			}
		}
		if (e.CertFile == "") != (e.KeyFile == "") {
			diags = append(diags, hclconf.Errorf(blocks[0].DefRange, "etcd tls: cert_file and key_file go together (the client certificate and its key)"))
		}
	}
	if tlsContent != nil && slices.ContainsFunc(e.Endpoints, func(s string) bool { return strings.HasPrefix(s, "http://") }) {
		diags = append(diags, hclconf.Errorf(blocks[0].DefRange, "etcd: a tls block with http:// endpoints: use https:// endpoints"))
	}
	cfg.Etcd = e
	return diags
}

// decodeReplicaName sets cfg.ReplicaName from the file or the hostname.
func decodeReplicaName(attrs hcl.Attributes, cfg *Config) hcl.Diagnostics {
	attr, ok := attrs["replica_name"]
	if !ok {
		h, err := os.Hostname()
		if err != nil || !replicaNameRE.MatchString(h) {
			h = "signer"
		}
		cfg.ReplicaName = h
		return nil
	}
	name, diags := hclconf.NonEmptyString(attr)
	if !diags.HasErrors() && !replicaNameRE.MatchString(name) {
		diags = append(diags, hclconf.Errorf(attr.Expr.Range(), "replica_name: %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", name))
	}
	cfg.ReplicaName = name
	return diags
}

// etcdTLS loads the etcd block's TLS files; nil without a tls block.
func (e *EtcdConfig) etcdTLS() (*tls.Config, error) {
	if e.CAFile == "" && e.CertFile == "" {
		if slices.ContainsFunc(e.Endpoints, func(s string) bool { return strings.HasPrefix(s, "https://") }) {
			return &tls.Config{MinVersion: tls.VersionTLS12}, nil // the system roots
		}
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.CAFile != "" {
		pem, err := os.ReadFile(e.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcd tls: ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd tls: ca_file %s holds no PEM certificate", e.CAFile)
		}
		c.RootCAs = pool
	}
	if e.CertFile != "" {
		// etcd's client credential: read here, kept in memory by the
		// etcd client, never copied or logged by the signer.
		cert, err := tls.LoadX509KeyPair(e.CertFile, e.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcd tls: cert_file/key_file: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// etcdOpTimeout bounds each etcd read and write of the signer.
const etcdOpTimeout = 2 * time.Second

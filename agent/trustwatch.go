package agent

import (
	"context"

	"github.com/lanyard-dev/lanyard/internal/filewatch"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
)

// watchTrust follows edits of trust_bundle_path until ctx ends. The file is
// how an operator tells the agent about a signer it cannot know otherwise
// (one restarted with a new CA), so a new authority in it is trusted at
// once, and the attestation and sync loops, and gRPC's reconnect, stop
// waiting out their backoff to use it.
func (u *upstream) watchTrust(ctx context.Context) error {
	if u.trustPath == "" {
		return nil // tests of the loops
	}
	w := &filewatch.Watcher{Path: u.trustPath, Loaded: u.loaded, Log: u.log.Named("trust")}
	return w.Run(ctx, func(data []byte) {
		b, err := x509bundle.Parse(u.td, data)
		if err != nil {
			u.log.Error("trust bundle file unusable; keeping the current trust", "path", u.trustPath, "error", err)
			return
		}
		added := u.addTrust(b)
		u.log.Info("trust bundle file reloaded", "path", u.trustPath, "authorities", len(b.X509Authorities()), "new", added)
		if added > 0 {
			u.retryNow()
		}
	})
}

// reloadTrust adds the authorities in trust_bundle_path to those the agent
// trusts the signer by. A signer restarted without its TPM-sealed keys is
// known only by the bundle file the operator distributes; re-reading it
// before every attestation lets the agent follow.
func (u *upstream) reloadTrust() {
	if u.trustPath == "" {
		return
	}
	b, err := x509bundle.Load(u.td, u.trustPath)
	if err != nil {
		u.log.Warn("cannot read trust bundle file", "path", u.trustPath, "error", err)
		return
	}
	u.addTrust(b)
}

// addTrust adds the authorities in b to those the signer is verified
// against, and returns how many were new. Nothing is removed: the signer's
// own bundle, pushed on the sync stream, is what retires a CA.
func (u *upstream) addTrust(b *x509bundle.Bundle) int {
	added := 0
	for _, c := range b.X509Authorities() {
		if !u.trust.HasX509Authority(c) {
			u.trust.AddX509Authority(c)
			added++
		}
	}
	return added
}

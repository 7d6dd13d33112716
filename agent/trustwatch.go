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
// waiting out their backoff to use it. loaded is the content Run started with.
func (a *Agent) watchTrust(ctx context.Context, loaded []byte) error {
	w := &filewatch.Watcher{Path: a.cfg.TrustBundlePath, Loaded: loaded, Log: a.log.Named("trust")}
	return w.Run(ctx, func(data []byte) {
		b, err := x509bundle.Parse(a.cfg.TrustDomain, data)
		if err != nil {
			a.log.Error("trust bundle file unusable; keeping the current trust", "path", a.cfg.TrustBundlePath, "error", err)
			return
		}
		added := a.addTrust(b)
		a.log.Info("trust bundle file reloaded", "path", a.cfg.TrustBundlePath, "authorities", len(b.X509Authorities()), "new", added)
		if added > 0 {
			a.retryNow()
		}
	})
}

// addTrust adds the authorities in b to those the signer is verified
// against, and returns how many were new. Nothing is removed: the signer's
// own bundle, pushed on the sync stream, is what retires a CA.
func (a *Agent) addTrust(b *x509bundle.Bundle) int {
	added := 0
	for _, c := range b.X509Authorities() {
		if !a.up.trust.HasX509Authority(c) {
			a.up.trust.AddX509Authority(c)
			added++
		}
	}
	return added
}

package signer

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// certReloader is the HTTPS certificate of the OIDC listener or of an
// https_web bundle endpoint, read from the block's tls files and read again when either file changes, so a
// renewed certificate (ACME renews every few weeks) is served without a
// restart. A pair that fails to load (a renewal caught halfway: new
// certificate, old key) leaves the last good one in use.
type certReloader struct {
	certFile, keyFile string
	log               hclog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   [2]fileStamp // of certFile and keyFile when cert was loaded
	badSeen [2]fileStamp // the last stamps that failed, logged once
}

// fileStamp tells one version of a file from another without reading it.
type fileStamp struct {
	mod  time.Time
	size int64
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{mod: fi.ModTime(), size: fi.Size()}, nil
}

// load reads the pair when it changed since the last load, and returns
// the certificate to serve. The first load's error fails the start; later
// ones keep the last good certificate.
func (c *certReloader) load() (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var now [2]fileStamp
	var err error
	for i, p := range []string{c.certFile, c.keyFile} {
		if now[i], err = stampOf(p); err != nil {
			return c.keep(now, fmt.Errorf("tls: %w", err))
		}
	}
	if c.cert != nil && now == c.stamp {
		return c.cert, nil
	}
	// The key is read into this process's memory only; errors from
	// crypto/tls name the problem, never the key's content.
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return c.keep(now, fmt.Errorf("tls: load cert_file %s and key_file %s: %w", c.certFile, c.keyFile, err))
	}
	if c.cert != nil {
		c.log.Info("listener certificate reloaded", "cert_file", c.certFile)
	}
	c.cert, c.stamp = &cert, now
	return c.cert, nil
}

// keep is load's answer to err: the last good certificate (err logged
// once per version of the files), or err when there is none.
func (c *certReloader) keep(now [2]fileStamp, err error) (*tls.Certificate, error) {
	if c.cert == nil {
		return nil, err
	}
	if now != c.badSeen {
		c.badSeen = now
		c.log.Warn("listener certificate not reloaded; serving the last good one", "error", err.Error())
	}
	return c.cert, nil
}

// listener wraps ln in TLS with the reloaded certificate.
func (c *certReloader) listener(ln net.Listener) net.Listener {
	return tls.NewListener(ln, &tls.Config{
		MinVersion:     tls.VersionTLS12, // what clouds' and Vault's HTTP clients speak
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.load() },
	})
}

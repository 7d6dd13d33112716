package policy

import (
	"errors"
	"net/netip"
	"strings"
)

// validateDNSName accepts a host name as it may appear in an X.509 DNS SAN:
// letter-digit-hyphen labels of 1 to 63 bytes, at most 253 bytes in all,
// optionally with a leading "*." wildcard label. IP addresses are refused:
// they belong in an IP SAN, and a verifier would not match them here.
func validateDNSName(name string) error {
	if name == "" {
		return errors.New("empty name")
	}
	if len(name) > 253 {
		return errors.New("longer than 253 bytes")
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return errors.New("an IP address, not a DNS name")
	}
	labels := strings.Split(strings.TrimPrefix(name, "*."), ".")
	for _, l := range labels {
		if err := validateLabel(l); err != nil {
			return err
		}
	}
	return nil
}

func validateLabel(l string) error {
	switch {
	case l == "":
		return errors.New("empty label")
	case len(l) > 63:
		return errors.New("label longer than 63 bytes")
	case l[0] == '-' || l[len(l)-1] == '-':
		return errors.New("label starts or ends with '-'")
	}
	for i := range len(l) {
		if c := l[i]; !isAlnum(c) && c != '-' {
			return errors.New("label contains a character other than a letter, digit or '-'")
		}
	}
	return nil
}

func isAlnum(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z'
}

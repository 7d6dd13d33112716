package policy

import (
	"strings"
	"testing"
)

func TestValidateDNSName(t *testing.T) {
	tests := []struct {
		name    string
		dns     string
		wantErr string
	}{
		{"simple", "web", ""},
		{"dotted", "web.example.org", ""},
		{"wildcard", "*.example.org", ""},
		{"digits and hyphens", "a-1.b2.example", ""},
		{"upper case", "Web.Example.Org", ""},
		{"63-byte label", strings.Repeat("a", 63) + ".example", ""},
		{"empty", "", "empty name"},
		{"64-byte label", strings.Repeat("a", 64) + ".example", "label longer than 63 bytes"},
		{"too long", strings.Repeat("a.", 127) + "ab", "longer than 253 bytes"},
		{"empty label", "a..b", "empty label"},
		{"trailing dot", "example.org.", "empty label"},
		{"leading hyphen", "-a.example", "label starts or ends with '-'"},
		{"underscore", "_srv.example", "label contains a character other than a letter, digit or '-'"},
		{"bare wildcard", "*", "label contains a character other than a letter, digit or '-'"},
		{"inner wildcard", "a.*.example", "label contains a character other than a letter, digit or '-'"},
		{"IPv4", "192.0.2.1", "an IP address, not a DNS name"},
		{"IPv6", "::1", "an IP address, not a DNS name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := validateDNSName(tt.dns)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tt.wantErr {
				t.Errorf("validateDNSName(%q) = %q, want %q", tt.dns, got, tt.wantErr)
			}
		})
	}
}

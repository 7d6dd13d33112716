package selector

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func FuzzValidate(f *testing.F) {
	for _, s := range []string{
		"unix:uid:1000", "unix:gid:0", "unix:user:www-data", "unix:group:adm",
		"unix:path:/usr/bin/x", "unix:sha256:" + strings.Repeat("ab", 32),
		"systemd:unit:getty@tty1.service", "cgroup:path:/a:b", "container:id:" + strings.Repeat("0", 64),
		"k8s:pod-uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "tpm:model:x", "a:b", "", "unix:uid:01",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := Validate(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			if typ, rest, ok := strings.Cut(s, ":"); ok {
				if key, value, ok := strings.Cut(rest, ":"); ok && ValidValue(typ+":"+key+":", value) {
					t.Fatalf("Validate refuses %q (%v), ValidValue accepts it", s, err)
				}
			}
			return
		}
		typ, rest, _ := strings.Cut(s, ":")
		key, value, ok := strings.Cut(rest, ":")
		if !ok || !utf8.ValidString(s) {
			t.Fatalf("accepted malformed selector %q", s)
		}
		if _, err := valueCheck(typ, key); err != nil {
			t.Fatalf("accepted %q with unknown type/key", s)
		}
		if strings.HasSuffix(key, "path") && !strings.HasPrefix(value, "/") {
			t.Fatalf("accepted relative path %q", s)
		}
		if !ValidValue(typ+":"+key+":", value) {
			t.Fatalf("Validate accepts %q, ValidValue refuses it", s)
		}
	})
}

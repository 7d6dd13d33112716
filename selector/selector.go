package selector

import (
	"errors"
	"fmt"
	"path"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ErrInvalidSelector is wrapped by every error ValidateSelector returns, so
// a caller can tell a bad selector from other failures.
var ErrInvalidSelector = errors.New("invalid selector")

// ValidateSelector reports whether s is a well-formed workload selector,
// "type:key:value" (the value may itself contain ':'). It checks the form
// the agent derives selectors in, not just the shape: a selector written in
// any other form (uid "0100", an upper-case hash, "/usr//bin/x") could
// never match a process, and would silently authorize nothing.
func ValidateSelector(s string) error {
	typ, rest, ok1 := strings.Cut(s, ":")
	key, value, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return fmt.Errorf("%w %q: want type:key:value", ErrInvalidSelector, s)
	}
	if !utf8.ValidString(s) || strings.IndexFunc(s, unicode.IsControl) >= 0 {
		return fmt.Errorf("%w %q: contains a control character or invalid UTF-8", ErrInvalidSelector, s)
	}
	check, err := selectorCheck(typ, key)
	if err == nil {
		err = check(value)
	}
	if err != nil {
		return fmt.Errorf("%w %q: %w", ErrInvalidSelector, s, err)
	}
	return nil
}

// selectorCheck returns the value check for a type and key. A switch
// rather than a map keeps the grammar in one readable place without a
// package-level variable.
func selectorCheck(typ, key string) (func(string) error, error) {
	var keys string
	switch typ {
	case "unix":
		switch key {
		case "uid", "gid":
			return checkID, nil
		case "user", "group":
			return checkAccountName, nil
		case "path":
			return checkAbsPath, nil
		case "sha256":
			return checkSHA256, nil
		}
		keys = "uid, gid, user, group, path, sha256"
	case "systemd":
		if key == "unit" {
			return checkUnit, nil
		}
		keys = "unit"
	case "cgroup":
		if key == "path" {
			return checkAbsPath, nil
		}
		keys = "path"
	case "container":
		if key == "id" {
			return checkContainerID, nil
		}
		keys = "id"
	case "k8s":
		if key == "pod-uid" {
			return checkPodUID, nil
		}
		keys = "pod-uid"
	case "tpm":
		return nil, errors.New(`tpm selectors describe hosts; name node blocks in "nodes" instead`)
	default:
		return nil, fmt.Errorf("unknown type %q (want unix, systemd, cgroup, container or k8s)", typ)
	}
	return nil, fmt.Errorf("unknown key %q for type %q (want %s)", key, typ, keys)
}

func checkID(v string) error {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != v {
		return errors.New("want a decimal number without leading zeros")
	}
	return nil
}

func checkAccountName(v string) error {
	switch {
	case v == "":
		return errors.New("name is empty")
	case len(v) > 256:
		return errors.New("name is longer than 256 bytes")
	case strings.ContainsAny(v, ":/") || strings.IndexFunc(v, unicode.IsSpace) >= 0:
		return errors.New("name contains ':', '/' or a space")
	}
	return nil
}

func checkAbsPath(v string) error {
	if !strings.HasPrefix(v, "/") {
		return errors.New("want an absolute path")
	}
	if path.Clean(v) != v {
		return fmt.Errorf("path is not clean (want %q)", path.Clean(v))
	}
	return nil
}

func checkSHA256(v string) error {
	if !isLowerHex(v, 64) {
		return errors.New("want 64 lowercase hex digits")
	}
	return nil
}

func checkContainerID(v string) error {
	if !isLowerHex(v, 64) {
		return errors.New("want a full container ID, 64 lowercase hex digits")
	}
	return nil
}

// checkPodUID accepts the canonical form of a pod UID, a lowercase UUID
// with dashes; the agent rewrites the underscores the systemd cgroup driver
// uses into dashes.
func checkPodUID(v string) error {
	ok := len(v) == 36
	for i := 0; ok && i < len(v); i++ {
		if i == 8 || i == 13 || i == 18 || i == 23 {
			ok = v[i] == '-'
		} else {
			ok = isLowerHexDigit(v[i])
		}
	}
	if !ok {
		return errors.New("want a lowercase UUID like 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
	}
	return nil
}

// unitSuffixes are the unit types a process can run in (a slice holds
// scopes and services, so it can name a process's cgroup too).
var unitSuffixes = [...]string{".service", ".scope", ".slice", ".socket", ".mount", ".swap", ".target", ".timer", ".path", ".device", ".automount"}

// checkUnit follows systemd's unit name rules: letters, digits and ":-_.\@",
// at most 255 bytes, ending in a unit type suffix.
func checkUnit(v string) error {
	if len(v) > 255 {
		return errors.New("unit name is longer than 255 bytes")
	}
	for _, c := range []byte(v) {
		if !isAlnum(c) && !strings.ContainsRune(`:-_.\@`, rune(c)) {
			return fmt.Errorf("unit name contains %q", c)
		}
	}
	for _, suf := range unitSuffixes {
		name, ok := strings.CutSuffix(v, suf)
		if !ok {
			continue
		}
		// A template ("web@.service") never runs; an instance needs a prefix.
		if name == "" || strings.HasPrefix(name, "@") || strings.HasSuffix(name, "@") {
			return errors.New("unit name has no name or instance before its suffix")
		}
		return nil
	}
	return errors.New(`want a unit name with its type suffix, like "web.service"`)
}

func isLowerHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := range len(s) {
		if !isLowerHexDigit(s[i]) {
			return false
		}
	}
	return true
}

func isLowerHexDigit(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' }

func isAlnum(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z'
}

// Package selector is the grammar of Lanyard's selectors, "type:key:value".
// Workload selectors are what the agent derives from the kernel's facts
// about a caller (attestor/workload) and what a policy's workload blocks
// require (signer/policy); node selectors are what the signer derives from
// an attested TPM (attestor/node). Both sides read this one grammar, so the
// agent never produces a selector no policy could write, and a policy never
// accepts a selector no process could carry.
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

// Prefixes of the workload selectors, "type:key:". The value follows in the
// form Validate checks.
const (
	UnixUID     = "unix:uid:"     // effective uid, decimal
	UnixGID     = "unix:gid:"     // effective gid, decimal
	UnixUser    = "unix:user:"    // the uid's user name
	UnixGroup   = "unix:group:"   // the gid's group name
	UnixPath    = "unix:path:"    // the executable's absolute, clean path
	UnixSHA256  = "unix:sha256:"  // the executable's SHA-256, lowercase hex
	SystemdUnit = "systemd:unit:" // the systemd unit the process runs in
	CgroupPath  = "cgroup:path:"  // the process's cgroup
	ContainerID = "container:id:" // the container's full ID, 64 lowercase hex
	K8sPodUID   = "k8s:pod-uid:"  // the Kubernetes pod UID, a lowercase dashed UUID
)

// Prefixes of the node selectors the signer derives from an attested TPM.
// Policy does not write them (a workload names node blocks instead), so
// Validate refuses them.
const (
	TPMEKSHA256     = "tpm:ek-sha256:"    // hex SHA-256 of the EK's PKIX public key
	TPMManufacturer = "tpm:manufacturer:" // from the EK certificate's TCG subjectAltName
	TPMModel        = "tpm:model:"        // likewise
	TPMVersion      = "tpm:version:"      // likewise
)

// ErrInvalid is wrapped by every error Validate returns, so a caller can
// tell a bad selector from other failures.
var ErrInvalid = errors.New("invalid selector")

// Validate reports whether s is a well-formed workload selector,
// "type:key:value" (the value may itself contain ':'). It checks the form
// the agent derives selectors in, not just the shape: a selector written in
// any other form (uid "0100", an upper-case hash, "/usr//bin/x") could
// never match a process, and would silently authorize nothing.
func Validate(s string) error {
	typ, rest, ok1 := strings.Cut(s, ":")
	key, value, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return fmt.Errorf("%w %q: want type:key:value", ErrInvalid, s)
	}
	if !validText(s) {
		return fmt.Errorf("%w %q: contains a control character or invalid UTF-8", ErrInvalid, s)
	}
	check, err := valueCheck(typ, key)
	if err == nil {
		err = check(value)
	}
	if err != nil {
		return fmt.Errorf("%w %q: %w", ErrInvalid, s, err)
	}
	return nil
}

// ValidValue reports whether prefix+value is a valid workload selector,
// where prefix is one of the workload prefixes above, without building the
// string. Attestors use it to leave out a selector no policy could express
// (a user name with a space, a path with a control character), which can
// only narrow what a caller is given. With TPMEKSHA256 it checks the form
// policy pins EKs in: 64 lowercase hex digits.
func ValidValue(prefix, value string) bool {
	if prefix == TPMEKSHA256 {
		return checkSHA256(value) == nil
	}
	typ, key, ok := strings.Cut(strings.TrimSuffix(prefix, ":"), ":")
	if !ok || !validText(value) {
		return false
	}
	check, err := valueCheck(typ, key)
	return err == nil && check(value) == nil
}

// validText refuses what no selector may hold.
func validText(s string) bool {
	return utf8.ValidString(s) && strings.IndexFunc(s, unicode.IsControl) < 0
}

// valueCheck returns the value check for a type and key. A switch
// rather than a map keeps the grammar in one readable place without a
// package-level variable.
func valueCheck(typ, key string) (func(string) error, error) {
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

// reason says why a value breaks the grammar. A constant one costs no
// allocation, so attestors may ask ValidValue of every value they see, and
// most are refused (every cgroup path component that is no unit).
type reason string

func (r reason) Error() string { return string(r) }

func checkID(v string) error {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != v {
		return reason("want a decimal number without leading zeros")
	}
	return nil
}

func checkAccountName(v string) error {
	switch {
	case v == "":
		return reason("name is empty")
	case len(v) > 256:
		return reason("name is longer than 256 bytes")
	case strings.ContainsAny(v, ":/") || strings.IndexFunc(v, unicode.IsSpace) >= 0:
		return reason("name contains ':', '/' or a space")
	}
	return nil
}

func checkAbsPath(v string) error {
	if !strings.HasPrefix(v, "/") {
		return reason("want an absolute path")
	}
	if path.Clean(v) != v {
		return fmt.Errorf("path is not clean (want %q)", path.Clean(v))
	}
	return nil
}

func checkSHA256(v string) error {
	if !isLowerHex(v, 64) {
		return reason("want 64 lowercase hex digits")
	}
	return nil
}

func checkContainerID(v string) error {
	if !isLowerHex(v, 64) {
		return reason("want a full container ID, 64 lowercase hex digits")
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
		return reason("want a lowercase UUID like 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
	}
	return nil
}

// unitSuffixes are the unit types systemd knows (a slice holds scopes and
// services, so it can name a process's cgroup too).
var unitSuffixes = [...]string{".service", ".scope", ".slice", ".socket", ".mount", ".swap", ".target", ".timer", ".path", ".device", ".automount"}

// checkUnit follows systemd's unit name rules: letters, digits and ":-_.\@",
// at most 255 bytes, ending in a unit type suffix.
func checkUnit(v string) error {
	if len(v) > 255 {
		return reason("unit name is longer than 255 bytes")
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
			return reason("unit name has no name or instance before its suffix")
		}
		return nil
	}
	return reason(`want a unit name with its type suffix, like "web.service"`)
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

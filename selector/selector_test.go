package selector

import (
	"errors"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	sha := strings.Repeat("0123456789abcdef", 4)
	tests := []struct {
		name     string
		selector string
		wantErr  string // "" when valid
	}{
		{"uid", "unix:uid:1000", ""},
		{"uid zero", "unix:uid:0", ""},
		{"gid max", "unix:gid:4294967295", ""},
		{"user", "unix:user:www-data", ""},
		{"group", "unix:group:ssl-cert", ""},
		{"path", "unix:path:/usr/bin/web", ""},
		{"path with colon", "unix:path:/opt/a:b/web", ""},
		{"sha256", "unix:sha256:" + sha, ""},
		{"systemd service", "systemd:unit:web.service", ""},
		{"systemd instance", "systemd:unit:getty@tty1.service", ""},
		{"systemd scope", "systemd:unit:session-4.scope", ""},
		{"systemd escaped slice", `systemd:unit:system-foo\x2dbar.slice`, ""},
		{"cgroup", "cgroup:path:/system.slice/web.service", ""},
		{"cgroup root", "cgroup:path:/", ""},
		{"container", "container:id:" + sha, ""},
		{"pod uid", "k8s:pod-uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", ""},

		{"empty", "", `invalid selector "": want type:key:value`},
		{"one colon", "unix:uid", `invalid selector "unix:uid": want type:key:value`},
		{"unknown type", "docker:id:x", `invalid selector "docker:id:x": unknown type "docker" (want unix, systemd, cgroup, container or k8s)`},
		{"unknown unix key", "unix:pid:1", `invalid selector "unix:pid:1": unknown key "pid" for type "unix" (want uid, gid, user, group, path, sha256)`},
		{"unknown systemd key", "systemd:slice:a.slice", `invalid selector "systemd:slice:a.slice": unknown key "slice" for type "systemd" (want unit)`},
		{"node selector", "tpm:ek-sha256:" + sha, `invalid selector "tpm:ek-sha256:` + sha + `": tpm selectors describe hosts; name node blocks in "nodes" instead`},
		{"type case matters", "UNIX:uid:1", `invalid selector "UNIX:uid:1": unknown type "UNIX" (want unix, systemd, cgroup, container or k8s)`},
		{"uid not a number", "unix:uid:root", `invalid selector "unix:uid:root": want a decimal number without leading zeros`},
		{"uid leading zero", "unix:uid:0100", `invalid selector "unix:uid:0100": want a decimal number without leading zeros`},
		{"uid negative", "unix:uid:-1", `invalid selector "unix:uid:-1": want a decimal number without leading zeros`},
		{"uid plus", "unix:uid:+1", `invalid selector "unix:uid:+1": want a decimal number without leading zeros`},
		{"gid too large", "unix:gid:4294967296", `invalid selector "unix:gid:4294967296": want a decimal number without leading zeros`},
		{"empty uid", "unix:uid:", `invalid selector "unix:uid:": want a decimal number without leading zeros`},
		{"empty user", "unix:user:", `invalid selector "unix:user:": name is empty`},
		{"user with colon", "unix:user:a:b", `invalid selector "unix:user:a:b": name contains ':', '/' or a space`},
		{"group with space", "unix:group:a b", `invalid selector "unix:group:a b": name contains ':', '/' or a space`},
		{"relative path", "unix:path:bin/web", `invalid selector "unix:path:bin/web": want an absolute path`},
		{"unclean path", "unix:path:/usr//bin/../bin/web", `invalid selector "unix:path:/usr//bin/../bin/web": path is not clean (want "/usr/bin/web")`},
		{"trailing slash cgroup", "cgroup:path:/system.slice/", `invalid selector "cgroup:path:/system.slice/": path is not clean (want "/system.slice")`},
		{"sha256 upper case", "unix:sha256:" + strings.ToUpper(sha), `invalid selector "unix:sha256:` + strings.ToUpper(sha) + `": want 64 lowercase hex digits`},
		{"sha256 short", "unix:sha256:abc", `invalid selector "unix:sha256:abc": want 64 lowercase hex digits`},
		{"unit without suffix", "systemd:unit:web", `invalid selector "systemd:unit:web": want a unit name with its type suffix, like "web.service"`},
		{"unit unknown suffix", "systemd:unit:web.serivce", `invalid selector "systemd:unit:web.serivce": want a unit name with its type suffix, like "web.service"`},
		{"unit template", "systemd:unit:getty@.service", `invalid selector "systemd:unit:getty@.service": unit name has no name or instance before its suffix`},
		{"unit suffix only", "systemd:unit:.service", `invalid selector "systemd:unit:.service": unit name has no name or instance before its suffix`},
		{"unit with slash", "systemd:unit:a/b.service", `invalid selector "systemd:unit:a/b.service": unit name contains '/'`},
		{"short container id", "container:id:abc123", `invalid selector "container:id:abc123": want a full container ID, 64 lowercase hex digits`},
		{"pod uid with underscores", "k8s:pod-uid:0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0", `invalid selector "k8s:pod-uid:0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0": want a lowercase UUID like 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0`},
		{"control character", "unix:path:/a\nb", `invalid selector "unix:path:/a\nb": contains a control character or invalid UTF-8`},
		{"invalid UTF-8", "unix:user:\xff", `invalid selector "unix:user:\xff": contains a control character or invalid UTF-8`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Validate(tt.selector)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate(%q) = %v, want nil", tt.selector, err)
				}
				return
			}
			if err == nil || err.Error() != tt.wantErr {
				t.Fatalf("Validate(%q) = %v\nwant %s", tt.selector, err, tt.wantErr)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error does not wrap ErrInvalid")
			}
		})
	}
}

// TestValidValue: what attestors ask (a value after a prefix) agrees with
// what policy asks (the whole selector), and the EK pin form is checked.
func TestValidValue(t *testing.T) {
	sha := strings.Repeat("0123456789abcdef", 4)
	tests := []struct {
		name          string
		prefix, value string
		want          bool
	}{
		{"uid", UnixUID, "1000", true},
		{"uid leading zero", UnixUID, "0100", false},
		{"user", UnixUser, "www-data", true},
		{"user with space", UnixUser, "a b", false},
		{"user with control character", UnixUser, "a\x7fb", false},
		{"path", UnixPath, "/usr/bin/web", true},
		{"path deleted marker stays a path", UnixPath, "/usr/bin/web (deleted)", true},
		{"unclean path", UnixPath, "/usr//bin", false},
		{"path with newline", UnixPath, "/a\nb", false},
		{"invalid UTF-8 path", UnixPath, "/\xff", false},
		{"sha256", UnixSHA256, sha, true},
		{"unit", SystemdUnit, "web.service", true},
		{"empty unit", SystemdUnit, "", false},
		{"slice is a unit", SystemdUnit, "system.slice", true},
		{"cgroup root", CgroupPath, "/", true},
		{"cgroup outside namespace", CgroupPath, "/../x", false},
		{"container id", ContainerID, sha, true},
		{"short container id", ContainerID, "abc", false},
		{"pod uid", K8sPodUID, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", true},
		{"ek pin", TPMEKSHA256, sha, true},
		{"ek pin upper case", TPMEKSHA256, strings.ToUpper(sha), false},
		{"node selector other than the pin", TPMModel, "x", false},
		{"unknown prefix", "docker:id:", sha, false},
		{"prefix without key", "unix:", "1000", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ValidValue(tt.prefix, tt.value); got != tt.want {
				t.Errorf("ValidValue(%q, %q) = %v, want %v", tt.prefix, tt.value, got, tt.want)
			}
			if tt.prefix == TPMEKSHA256 {
				return // policy never writes node selectors
			}
			if err := Validate(tt.prefix + tt.value); (err == nil) != tt.want {
				t.Errorf("Validate(%q) = %v, but ValidValue says %v", tt.prefix+tt.value, err, tt.want)
			}
		})
	}
}

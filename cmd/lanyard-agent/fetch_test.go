package main

import (
	"strings"
	"testing"
)

func TestSocketAddr(t *testing.T) {
	tests := []struct {
		name, flag, env, want string
	}{
		{"default", "", "", "unix://" + defaultSocket},
		{"flag path", "/tmp/w.sock", "", "unix:///tmp/w.sock"},
		{"flag address", "unix:///tmp/w.sock", "", "unix:///tmp/w.sock"},
		{"env address", "", "unix:///run/x.sock", "unix:///run/x.sock"},
		{"env path without a scheme", "", "/run/x.sock", "unix:///run/x.sock"},
		{"env tcp", "", "tcp://127.0.0.1:8081", "tcp://127.0.0.1:8081"},
		{"flag wins over env", "/a.sock", "/b.sock", "unix:///a.sock"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("SPIFFE_ENDPOINT_SOCKET", tc.env)
			if got := socketAddr(tc.flag); got != tc.want {
				t.Errorf("socketAddr(%q) with SPIFFE_ENDPOINT_SOCKET=%q = %q, want %q", tc.flag, tc.env, got, tc.want)
			}
		})
	}
}

func TestFetchJWTActionUsage(t *testing.T) {
	tests := []struct {
		name string
		args []string
	}{
		{"two audiences", []string{"--action", "deploy", "--audience", "a", "--audience", "b"}},
		{"no audience", []string{"--action", "deploy"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut strings.Builder
			if code := fetchJWT(tc.args, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "--action NAME --audience A") {
				t.Errorf("exit %d, stderr %q; want 2 and the usage", code, errOut.String())
			}
		})
	}
}

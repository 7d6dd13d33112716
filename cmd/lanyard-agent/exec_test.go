package main

import (
	"strings"
	"testing"
)

// TestExecBadFlags: each bad invocation exits 2 with the usage and a
// message naming the problem, before anything is started.
func TestExecBadFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no command", []string{"--socket", "/x.sock"}, "no command"},
		{"only --", []string{"--"}, "no command"},
		{"unknown signal", []string{"--signal", "BOGUS", "--", "true"}, `--signal "BOGUS": not a signal name`},
		{"signal that stops", []string{"--signal", "KILL", "--", "true"}, "would stop the command"},
		{"bad spiffe id", []string{"--spiffe-id", "web", "--", "true"}, `--spiffe-id "web"`},
		{"bad mount mode", []string{"--private-mount", "maybe", "--", "true"}, `--private-mount "maybe"`},
		{"zero timeout", []string{"--timeout", "0s", "--", "true"}, "--timeout must be positive"},
		{"empty audience", []string{"--jwt-audience", "", "--", "true"}, "audience must not be empty"},
		{"unknown flag", []string{"--nope", "--", "true"}, "flag provided but not defined"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stderr strings.Builder
			if code := execCommand(tc.args, &stderr); code != 2 {
				t.Errorf("exit %d, want 2\n%s", code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.want) || !strings.Contains(stderr.String(), "usage: lanyard-agent exec") {
				t.Errorf("stderr lacks %q or the usage:\n%s", tc.want, stderr.String())
			}
		})
	}
}

package cli

import (
	"errors"
	"flag"
	"io"
	"slices"
	"testing"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantPos  []string
		wantAud  string
		wantExit int // when an error is expected: FlagExit(err, 2)
		wantErr  bool
	}{
		{name: "flags first", args: []string{"--audience", "a", "TOKEN"}, wantPos: []string{"TOKEN"}, wantAud: "a"},
		{name: "flags after the argument", args: []string{"TOKEN", "--audience", "a"}, wantPos: []string{"TOKEN"}, wantAud: "a"},
		{name: "mixed", args: []string{"x", "--audience=a", "y"}, wantPos: []string{"x", "y"}, wantAud: "a"},
		{name: "after --", args: []string{"--", "--audience", "a"}, wantPos: []string{"--audience", "a"}},
		{name: "help", args: []string{"TOKEN", "--help"}, wantErr: true, wantExit: 0},
		{name: "short help", args: []string{"-h"}, wantErr: true, wantExit: 0},
		{name: "unknown flag", args: []string{"--nope"}, wantErr: true, wantExit: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			aud := fs.String("audience", "", "")
			pos, err := ParseFlags(fs, tc.args)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("ParseFlags(%q) = %q, nil; want an error", tc.args, pos)
				}
				if got := FlagExit(err, 2); got != tc.wantExit {
					t.Errorf("FlagExit = %d, want %d", got, tc.wantExit)
				}
				return
			}
			if err != nil || !slices.Equal(pos, tc.wantPos) || *aud != tc.wantAud {
				t.Errorf("ParseFlags(%q) = %q, %v, audience %q; want %q, audience %q", tc.args, pos, err, *aud, tc.wantPos, tc.wantAud)
			}
		})
	}
	if FlagExit(errors.New("x"), 5) != 5 {
		t.Error("FlagExit ignores its code")
	}
}

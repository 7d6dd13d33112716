package policy

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

// ParseFiles must read ek_ca files from the map only, and fail exactly as
// Load does when one is missing, so `policy apply` and every replica of a
// tier report the same file:line errors as `policy check`.
func TestParseFiles(t *testing.T) {
	validPath := filepath.Join("..", "..", "testdata", "policy", "valid.hcl")
	invalidPath := filepath.Join("..", "..", "testdata", "policy", "invalid.hcl")
	caPath, err := filepath.Abs(filepath.Join("..", "..", "testdata", "policy", "ek-ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(caPath)
	if err != nil {
		t.Fatal(err)
	}
	fromDisk, err := Load(validPath, testTD)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	_, invalidErr := Load(invalidPath, testTD)
	if invalidErr == nil {
		t.Fatal("Load of invalid.hcl succeeded")
	}

	tests := []struct {
		name    string
		file    string
		files   map[string][]byte
		wantErr string // "" = same policy as Load
	}{
		{name: "every file given", file: validPath, files: map[string][]byte{caPath: ca}},
		{name: "extra files are ignored", file: validPath, files: map[string][]byte{caPath: ca, "/elsewhere.pem": []byte("junk")}},
		{
			// The file exists on disk next to valid.hcl: ParseFiles must not read it.
			name: "disk is never read", file: validPath, files: nil,
			wantErr: validPath + `:8: ek_ca: cannot read "` + caPath + `": no such file or directory`,
		},
		{
			name: "relative key does not match", file: validPath, files: map[string][]byte{"ek-ca.pem": ca},
			wantErr: validPath + `:8: ek_ca: cannot read "` + caPath + `": no such file or directory`,
		},
		{name: "invalid policy: same errors as Load", file: invalidPath, files: nil, wantErr: invalidErr.Error()},
		{
			name: "malformed certificate", file: validPath, files: map[string][]byte{caPath: []byte("-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n")},
			wantErr: validPath + `:8: ek_ca: "` + caPath + `": certificate 1: x509: malformed certificate`,
		},
		{
			name: "oversized file", file: validPath, files: map[string][]byte{caPath: bytes.Repeat([]byte{'x'}, maxCAFileSize+1)},
			wantErr: validPath + `:8: ek_ca: "` + caPath + `" is larger than 4194304 bytes`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, err := os.ReadFile(tt.file)
			if err != nil {
				t.Fatal(err)
			}
			p, err := ParseFiles(src, tt.file, testTD, tt.files)
			if tt.wantErr != "" {
				var errs hclconf.Errors
				if !errors.As(err, &errs) {
					t.Fatalf("ParseFiles error = %v, want hclconf.Errors", err)
				}
				if diff := cmp.Diff(tt.wantErr, err.Error()); diff != "" {
					t.Errorf("ParseFiles error (-want +got):\n%s", diff)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseFiles: %v", err)
			}
			if diff := cmp.Diff(fromDisk, p, policyOpts); diff != "" {
				t.Errorf("ParseFiles differs from Load (-want +got):\n%s", diff)
			}
			if !p.Nodes[0].Roots.Equal(fromDisk.Nodes[0].Roots) {
				t.Errorf("lab roots differ from Load's")
			}
			if !strings.HasSuffix(p.Nodes[0].EKCA[0], "ek-ca.pem") {
				t.Errorf("EKCA = %v, want the resolved path", p.Nodes[0].EKCA)
			}
		})
	}
}

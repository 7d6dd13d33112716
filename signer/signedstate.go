package signer

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
)

// SignedStateFile is the file in state_dir where a signer with memory
// keys records which published CAs and JWT keys have signed something
// ("ca:<serial>", "jwt:<kid>"). A restart cannot sign with those keys
// again, and the ones never used vouch for nothing: they are dropped
// instead of staying in the bundle for ca_ttl, so crash-restarts do not
// grow the bundle. Public data only.
const SignedStateFile = "signed.json"

type signedStateDoc struct {
	Signed []string `json:"signed"`
}

// loadSignedState reads dir's SignedStateFile. A missing file gives nil:
// a state dir from before the file existed keeps every CA.
func loadSignedState(dir string) (map[string]bool, error) {
	data, path, err := readState(dir, SignedStateFile)
	if err != nil || data == nil {
		return nil, wrapErr("read signed state", err)
	}
	var doc signedStateDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%w %s: not a JSON signed list", ErrBadCAState, path)
	}
	ids := make(map[string]bool, len(doc.Signed))
	for i, id := range doc.Signed {
		if !strings.HasPrefix(id, "ca:") && !strings.HasPrefix(id, "jwt:") {
			return nil, fmt.Errorf("%w %s: entry %d is neither ca:<serial> nor jwt:<kid>", ErrBadCAState, path, i+1)
		}
		ids[id] = true
	}
	return ids, nil
}

// saveSignedState records ids in dir, atomically.
func saveSignedState(dir string, ids []string) error {
	data, err := json.MarshalIndent(signedStateDoc{Signed: append([]string{}, ids...)}, "", "  ")
	if err != nil {
		return fmt.Errorf("save signed state: %w", err)
	}
	if err := writeAtomic(filepath.Join(dir, SignedStateFile), append(data, '\n')); err != nil {
		return fmt.Errorf("save signed state: %w", err)
	}
	return nil
}

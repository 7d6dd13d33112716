package signer

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"github.com/lanyard-dev/lanyard/attestor/node"
)

// SealedKeyFile is the file in state_dir holding the data-encryption key
// (DEK) sealed to the signer's TPM: the public and private blobs of a TPM
// sealed-data object whose parent is a primary storage key derived from
// the TPM's owner seed. The private blob is encrypted by that parent, so
// only the same TPM can load it and unseal the DEK.
const SealedKeyFile = "sealed-key.json"

// SigningKeysFile is the file in state_dir holding the private CA and JWT
// keys of the signing and the prepared CA generations, each encrypted with
// the DEK (AES-256-GCM, a fresh nonce per write, the key's public ID as
// associated data). Without the TPM that sealed the DEK it is noise.
const SigningKeysFile = "signing-keys.json"

// ErrKeyStorage is returned by New when the sealed keys in state_dir
// cannot be used: a state dir from another TPM, a sealed-key file missing
// while encrypted keys exist, a key that does not decrypt or does not
// match its certificate. The signer refuses to start rather than make a
// new CA the fleet does not trust; the error names the file.
var ErrKeyStorage = errors.New("unusable key storage")

// dekSize is the DEK's length: an AES-256 key.
const dekSize = 32

// storageTemplate is the primary storage key the DEK is sealed under. A
// primary key is derived from the hierarchy's seed and its template, so
// this template gives the same key on the same TPM at every start (no
// persistent handle to manage) and a different key on any other TPM.
var storageTemplate = tpm2.Public{
	Type:    tpm2.AlgECC,
	NameAlg: tpm2.AlgSHA256,
	Attributes: tpm2.FlagFixedTPM | tpm2.FlagFixedParent | tpm2.FlagSensitiveDataOrigin |
		tpm2.FlagUserWithAuth | tpm2.FlagRestricted | tpm2.FlagDecrypt | tpm2.FlagNoDA,
	ECCParameters: &tpm2.ECCParams{
		Symmetric: &tpm2.SymScheme{Alg: tpm2.AlgAES, KeyBits: 128, Mode: tpm2.AlgCFB},
		CurveID:   tpm2.CurveNISTP256,
		// A Lanyard-specific unique value: this is the signer's own
		// storage key, not the TPM's well-known SRK.
		Point: tpm2.ECPoint{XRaw: []byte("lanyard-signer key storage v1")},
	},
}

// sealTemplate is the sealed-data object holding the DEK: bound to its
// parent and this TPM, readable with an empty auth (the TPM itself, not a
// password, is the protection), never duplicable.
var sealTemplate = tpm2.Public{
	Type:                tpm2.AlgKeyedHash,
	NameAlg:             tpm2.AlgSHA256,
	Attributes:          tpm2.FlagFixedTPM | tpm2.FlagFixedParent | tpm2.FlagUserWithAuth | tpm2.FlagNoDA,
	KeyedHashParameters: &tpm2.KeyedHashParams{Alg: tpm2.AlgNull},
}

type sealedKeyDoc struct {
	Version int    `json:"version"`
	Public  []byte `json:"public"`
	Private []byte `json:"private"`
}

// keyStore encrypts and decrypts the signer's private keys with the DEK,
// which it holds in memory only.
type keyStore struct {
	dir  string
	aead cipher.AEAD
}

// openKeyStore unseals the DEK that dir's SealedKeyFile holds with tpm,
// or, on a first start (no sealed key and no encrypted keys), creates a
// DEK and seals it. Every refusal is ErrKeyStorage naming the file.
func openKeyStore(dir string, tpm *node.TPM) (*keyStore, error) {
	sealedPath := filepath.Join(dir, SealedKeyFile)
	data, err := os.ReadFile(sealedPath)
	var dek []byte
	switch {
	case errors.Is(err, fs.ErrNotExist):
		keysPath := filepath.Join(dir, SigningKeysFile)
		if _, err := os.Stat(keysPath); err == nil {
			return nil, fmt.Errorf("%w %s: missing, but %s holds encrypted keys (restore the file; never delete the keys to start over while their CAs are trusted)", ErrKeyStorage, sealedPath, SigningKeysFile)
		}
		dek = make([]byte, dekSize)
		if _, err := rand.Read(dek); err != nil {
			return nil, fmt.Errorf("generate key-encryption key: %w", err)
		}
		var doc sealedKeyDoc
		if err := tpm.WithChannel(func(rw io.ReadWriter) (err error) {
			doc.Public, doc.Private, err = sealDEK(rw, dek)
			return err
		}); err != nil {
			return nil, fmt.Errorf("seal key-encryption key to the TPM: %w", err)
		}
		doc.Version = 1
		out, err := json.MarshalIndent(doc, "", "  ")
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", sealedPath, err)
		}
		if err := writeAtomicMode(sealedPath, append(out, '\n'), 0o600); err != nil {
			return nil, fmt.Errorf("save sealed key: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("%w %s: %v", ErrKeyStorage, sealedPath, err)
	default:
		var doc sealedKeyDoc
		if err := json.Unmarshal(data, &doc); err != nil || doc.Version != 1 || len(doc.Public) == 0 || len(doc.Private) == 0 {
			return nil, fmt.Errorf("%w %s: not a version 1 sealed key", ErrKeyStorage, sealedPath)
		}
		if err := tpm.WithChannel(func(rw io.ReadWriter) (err error) {
			dek, err = unsealDEK(rw, doc.Public, doc.Private)
			return err
		}); err != nil {
			return nil, fmt.Errorf("%w %s: this TPM cannot unseal it (a state dir from another host, or a cleared TPM): %v", ErrKeyStorage, sealedPath, err)
		}
		if len(dek) != dekSize {
			return nil, fmt.Errorf("%w %s: unsealed key has %d bytes, want %d", ErrKeyStorage, sealedPath, len(dek), dekSize)
		}
	}
	defer clear(dek)
	block, err := aes.NewCipher(dek)
	if err != nil {
		return nil, fmt.Errorf("key-encryption cipher: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("key-encryption cipher: %w", err)
	}
	return &keyStore{dir: dir, aead: aead}, nil
}

// storagePrimary creates (recreates: it is deterministic) the storage
// key under the owner hierarchy. The caller flushes it.
func storagePrimary(rw io.ReadWriter) (tpmutil.Handle, error) {
	h, _, err := tpm2.CreatePrimary(rw, tpm2.HandleOwner, tpm2.PCRSelection{}, "", "", storageTemplate)
	if err != nil {
		return 0, fmt.Errorf("create storage primary key: %w", err)
	}
	return h, nil
}

// sealDEK seals dek under the storage primary key and returns the sealed
// object's public and private blobs.
func sealDEK(rw io.ReadWriter, dek []byte) (pub, priv []byte, err error) {
	parent, err := storagePrimary(rw)
	if err != nil {
		return nil, nil, err
	}
	defer tpm2.FlushContext(rw, parent)
	priv, pub, _, _, _, err = tpm2.CreateKeyWithSensitive(rw, parent, tpm2.PCRSelection{}, "", "", sealTemplate, dek)
	if err != nil {
		return nil, nil, fmt.Errorf("create sealed object: %w", err)
	}
	return pub, priv, nil
}

// unsealDEK loads the sealed object under the storage primary key and
// unseals it. Another TPM derives another primary key, and Load fails
// its integrity check.
func unsealDEK(rw io.ReadWriter, pub, priv []byte) ([]byte, error) {
	parent, err := storagePrimary(rw)
	if err != nil {
		return nil, err
	}
	defer tpm2.FlushContext(rw, parent)
	h, _, err := tpm2.Load(rw, parent, "", pub, priv)
	if err != nil {
		return nil, fmt.Errorf("load sealed object: %w", err)
	}
	defer tpm2.FlushContext(rw, h)
	dek, err := tpm2.Unseal(rw, h, "")
	if err != nil {
		return nil, fmt.Errorf("unseal: %w", err)
	}
	return dek, nil
}

// encryptedKey is one private key as stored: AES-256-GCM under the DEK.
type encryptedKey struct {
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ciphertext"`
}

// keyGeneration is one CA generation's private keys as stored.
type keyGeneration struct {
	Role     string       `json:"role"` // "active" or "next"
	CASerial string       `json:"ca_serial"`
	CAKey    encryptedKey `json:"ca_key"`
	KID      string       `json:"kid"`
	JWTKey   encryptedKey `json:"jwt_key"`
}

type signingKeysDoc struct {
	Version     int             `json:"version"`
	Generations []keyGeneration `json:"generations"`
}

// Roles of a stored key generation.
const (
	roleActive = "active"
	roleNext   = "next"
)

// restoredKeys is one generation's keys, decrypted.
type restoredKeys struct {
	role     string
	caSerial string
	caKey    *ecdsa.PrivateKey
	kid      string
	jwtKey   *ecdsa.PrivateKey
}

func caAAD(serial string) []byte { return []byte("lanyard ca key " + serial) }
func jwtAAD(kid string) []byte   { return []byte("lanyard jwt key " + kid) }

func (ks *keyStore) seal(key *ecdsa.PrivateKey, aad []byte) (encryptedKey, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return encryptedKey{}, fmt.Errorf("encode private key: %w", err)
	}
	defer clear(der)
	nonce := make([]byte, ks.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return encryptedKey{}, fmt.Errorf("generate nonce: %w", err)
	}
	return encryptedKey{Nonce: nonce, Ciphertext: ks.aead.Seal(nil, nonce, der, aad)}, nil
}

func (ks *keyStore) open(e encryptedKey, aad []byte) (*ecdsa.PrivateKey, error) {
	if len(e.Nonce) != ks.aead.NonceSize() {
		return nil, errors.New("bad nonce length")
	}
	der, err := ks.aead.Open(nil, e.Nonce, e.Ciphertext, aad)
	if err != nil {
		return nil, errors.New("does not decrypt with this TPM's key (tampered, or from another state dir)")
	}
	defer clear(der)
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, errors.New("decrypted, but not a PKCS #8 key")
	}
	ec, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("not an ECDSA key")
	}
	return ec, nil
}

// save writes the private keys of active and next (nil when none),
// encrypted, atomically.
func (ks *keyStore) save(active *CA, activeJWT *jwtKey, next *CA, nextJWT *jwtKey) error {
	doc := signingKeysDoc{Version: 1}
	add := func(role string, ca *CA, k *jwtKey) error {
		serial := serialHex(ca.Cert)
		caKey, err := ks.seal(ca.key, caAAD(serial))
		if err != nil {
			return err
		}
		jwtKey, err := ks.seal(k.priv, jwtAAD(k.kid))
		if err != nil {
			return err
		}
		doc.Generations = append(doc.Generations, keyGeneration{Role: role, CASerial: serial, CAKey: caKey, KID: k.kid, JWTKey: jwtKey})
		return nil
	}
	if err := add(roleActive, active, activeJWT); err != nil {
		return fmt.Errorf("save signing keys: %w", err)
	}
	if next != nil {
		if err := add(roleNext, next, nextJWT); err != nil {
			return fmt.Errorf("save signing keys: %w", err)
		}
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("save signing keys: %w", err)
	}
	if err := writeAtomicMode(filepath.Join(ks.dir, SigningKeysFile), append(out, '\n'), 0o600); err != nil {
		return fmt.Errorf("save signing keys: %w", err)
	}
	return nil
}

// load reads and decrypts the stored generations. A missing file (first
// start) gives none.
func (ks *keyStore) load() ([]restoredKeys, error) {
	data, path, err := readState(ks.dir, SigningKeysFile)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %v", ErrKeyStorage, path, err)
	}
	if data == nil {
		return nil, nil
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w %s: %s", ErrKeyStorage, path, fmt.Sprintf(format, args...))
	}
	var doc signingKeysDoc
	if err := json.Unmarshal(data, &doc); err != nil || doc.Version != 1 {
		return nil, bad("not a version 1 signing key file")
	}
	var out []restoredKeys
	for i, g := range doc.Generations {
		n := i + 1
		if g.Role != roleActive && g.Role != roleNext || g.CASerial == "" || g.KID == "" {
			return nil, bad("generation %d: missing role, ca_serial or kid", n)
		}
		caKey, err := ks.open(g.CAKey, caAAD(g.CASerial))
		if err != nil {
			return nil, bad("generation %d: CA key (serial %s) %v", n, g.CASerial, err)
		}
		jwtKey, err := ks.open(g.JWTKey, jwtAAD(g.KID))
		if err != nil {
			return nil, bad("generation %d: JWT key (kid %s) %v", n, g.KID, err)
		}
		out = append(out, restoredKeys{role: g.Role, caSerial: g.CASerial, caKey: caKey, kid: g.KID, jwtKey: jwtKey})
	}
	return out, nil
}

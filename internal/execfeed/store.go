package execfeed

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// The names under the files' root. The child's paths all go through
// currentLink, so that one rename switches every file at once.
const (
	currentLink = "current"
	nextLink    = "current.next"
	certName    = "cert.pem"
	keyName     = "key.pem"
	bundleName  = "bundle.pem"
	jwtName     = "jwt"
)

// The child's environment variables, one per file.
const (
	EnvCert   = "LANYARD_CERT_FILE"
	EnvKey    = "LANYARD_KEY_FILE"
	EnvBundle = "LANYARD_BUNDLE_FILE"
	EnvJWT    = "LANYARD_JWT_FILE"
)

// Files is one generation of what the child reads: the X.509-SVID's chain
// (PEM), its key (PKCS#8 PEM), its trust domain's bundle (PEM) and, when
// asked for, a JWT-SVID.
type Files struct {
	Cert, Key, Bundle []byte
	JWT               []byte // nil: no token file
}

// Store keeps the generations under one directory, reached through a
// descriptor: in a private mount namespace that directory is not
// reachable by path from exec, but a descriptor works across namespaces.
// Not safe for concurrent use; the supervisor's loop owns it.
type Store struct {
	dir     *os.File // the files' root
	path    string   // the same root as the child sees it
	seq     int
	current string   // generation "current" points at; "" before the first
	old     []string // earlier generations not removed yet
}

// newStore takes ownership of dir, the root of an empty directory that
// the child reaches at path.
func newStore(dir *os.File, path string) *Store {
	return &Store{dir: dir, path: path}
}

// Env is the child's environment entries for the files; LANYARD_JWT_FILE
// only when withJWT.
func (s *Store) Env(withJWT bool) []string {
	cur := filepath.Join(s.path, currentLink)
	env := []string{
		EnvCert + "=" + filepath.Join(cur, certName),
		EnvKey + "=" + filepath.Join(cur, keyName),
		EnvBundle + "=" + filepath.Join(cur, bundleName),
	}
	if withJWT {
		env = append(env, EnvJWT+"="+filepath.Join(cur, jwtName))
	}
	return env
}

// Switch writes f as a new generation, complete, in its own directory,
// then points "current" at it by renaming a new symlink over the old one:
// a reader that opens the files after Switch returns gets only the new
// generation. Generations older than the one it replaces are removed
// first. On an error, "current" is unchanged and the partial generation
// removed.
func (s *Store) Switch(f Files) error {
	if err := s.removeOld(); err != nil {
		return err
	}
	s.seq++
	name := "g" + strconv.Itoa(s.seq)
	fd := int(s.dir.Fd())
	if err := unix.Mkdirat(fd, name, 0o700); err != nil {
		return fmt.Errorf("switch files: mkdir %s: %w", name, err)
	}
	if err := unix.Fchmodat(fd, name, 0o700, 0); err != nil { // whatever the umask
		return errors.Join(fmt.Errorf("switch files: chmod %s: %w", name, err), s.remove(name))
	}
	if err := s.fill(name, f); err != nil {
		return errors.Join(fmt.Errorf("switch files: %w", err), s.remove(name))
	}
	if err := unix.Unlinkat(fd, nextLink, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return errors.Join(fmt.Errorf("switch files: remove stale %s: %w", nextLink, err), s.remove(name))
	}
	if err := unix.Symlinkat(name, fd, nextLink); err != nil {
		return errors.Join(fmt.Errorf("switch files: symlink %s: %w", nextLink, err), s.remove(name))
	}
	if err := unix.Renameat(fd, nextLink, fd, currentLink); err != nil {
		return errors.Join(fmt.Errorf("switch files: rename %s over %s: %w", nextLink, currentLink, err), s.remove(name))
	}
	if s.current != "" {
		s.old = append(s.old, s.current)
	}
	s.current = name
	return nil
}

// fill writes the files of generation gen, each 0600.
func (s *Store) fill(gen string, f Files) error {
	files := []struct {
		name string
		data []byte
	}{{certName, f.Cert}, {keyName, f.Key}, {bundleName, f.Bundle}}
	if f.JWT != nil {
		files = append(files, struct {
			name string
			data []byte
		}{jwtName, f.JWT})
	}
	for _, file := range files {
		if err := s.write(gen+"/"+file.name, file.data); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) write(rel string, data []byte) error {
	fd, err := unix.Openat(int(s.dir.Fd()), rel, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", rel, err)
	}
	f := os.NewFile(uintptr(fd), rel)
	// The umask may have taken bits from 0600; the owner must read.
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(data)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", rel, err)
	}
	return nil
}

// Retire removes every generation but the current one: called a grace
// period after a switch, so that a reader that resolved the old
// directory just before the switch still finds its files.
func (s *Store) Retire() error { return s.removeOld() }

func (s *Store) removeOld() error {
	var errs []error
	for _, gen := range s.old {
		errs = append(errs, s.remove(gen))
	}
	s.old = nil
	return errors.Join(errs...)
}

// remove deletes generation gen, whatever of it exists.
func (s *Store) remove(gen string) error {
	fd := int(s.dir.Fd())
	var errs []error
	for _, name := range []string{certName, keyName, bundleName, jwtName} {
		if err := unix.Unlinkat(fd, gen+"/"+name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove %s/%s: %w", gen, name, err))
		}
	}
	if err := unix.Unlinkat(fd, gen, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("remove %s: %w", gen, err))
	}
	return errors.Join(errs...)
}

// Close removes every generation and the link, and closes the
// descriptor. In a private namespace the tmpfs goes away with the
// namespace anyway; removing first makes a fallback directory empty.
func (s *Store) Close() error {
	if s.current != "" {
		s.old = append(s.old, s.current)
		s.current = ""
	}
	errs := []error{s.removeOld()}
	for _, link := range []string{currentLink, nextLink} {
		if err := unix.Unlinkat(int(s.dir.Fd()), link, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove %s: %w", link, err))
		}
	}
	errs = append(errs, s.dir.Close())
	return errors.Join(errs...)
}

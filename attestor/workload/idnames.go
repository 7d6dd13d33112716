package workload

import (
	"errors"
	"os/user"
	"sync"
	"time"
)

// The user database files the pure-Go os/user reads (CGO_ENABLED=0, as
// the release binaries are built, or the osusergo tag): with cgo, lookups
// go through NSS, which may ask other sources, and are not cached.
const (
	passwdFile = "/etc/passwd"
	groupFile  = "/etc/group"
	// maxCachedNames bounds each of the two name maps; past it the map
	// starts over.
	maxCachedNames = 4096
)

// idNames remembers the user and group names of uids and gids for one
// version of /etc/passwd and /etc/group each, so that a call costs a stat
// of each file instead of reading and parsing it (BENCHMARKS.md, "Issue
// 19"). A version is the file's device, inode, size, mtime and ctime, as
// for executable hashes; a file changed within settle of now is not cached
// from (coarse timestamps could give two versions one key), and any other
// version of a file empties its map. The answer is therefore always the
// one a lookup would give on the version the stat saw.
type idNames struct {
	settle time.Duration
	// The files and lookups; tests replace them. A lookup returns "" and
	// no error for an id without a name (cached as such), an error when
	// the file could not be read (not cached).
	passwd, group           string
	lookupUser, lookupGroup func(id string) (string, error)

	mu           sync.Mutex
	users        names // under mu
	groups       names // under mu
	userLookups  int   // lookups made, for tests; under mu
	groupLookups int
}

// names is one file's cached answers: "" for an id with no name.
type names struct {
	version exeKey
	byID    map[string]string
}

func newIDNames() *idNames {
	return &idNames{
		settle: hashSettle,
		passwd: passwdFile,
		group:  groupFile,
		lookupUser: func(id string) (string, error) {
			u, err := user.LookupId(id)
			if errors.As(err, new(user.UnknownUserIdError)) {
				return "", nil
			}
			if err != nil {
				return "", err
			}
			return u.Username, nil
		},
		lookupGroup: func(id string) (string, error) {
			g, err := user.LookupGroupId(id)
			if errors.As(err, new(user.UnknownGroupIdError)) {
				return "", nil
			}
			if err != nil {
				return "", err
			}
			return g.Name, nil
		},
	}
}

// user returns the name of uid (decimal), or "" when it has none or the
// lookup failed.
func (n *idNames) user(uid string) string {
	return n.name(n.passwd, &n.users, n.lookupUser, &n.userLookups, uid)
}

// groupName returns the name of gid (decimal), or "" as user does.
func (n *idNames) groupName(gid string) string {
	return n.name(n.group, &n.groups, n.lookupGroup, &n.groupLookups, gid)
}

func (n *idNames) name(path string, c *names, lookup func(string) (string, error), lookups *int, id string) string {
	version, ok, err := pathKey(path)
	cacheable := err == nil && ok && time.Since(time.Unix(0, version.ctime)) >= n.settle
	if cacheable {
		n.mu.Lock()
		if c.version == version {
			if name, hit := c.byID[id]; hit {
				n.mu.Unlock()
				return name
			}
		}
		n.mu.Unlock()
	}
	name, err := lookup(id)
	if err != nil {
		// The file could not be read: no selector, as before the
		// cache, and nothing cached.
		name = ""
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	*lookups++
	if !cacheable || err != nil {
		return name
	}
	if c.version != version || len(c.byID) >= maxCachedNames {
		*c = names{version: version, byID: make(map[string]string)}
	}
	c.byID[id] = name
	return name
}

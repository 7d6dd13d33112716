//go:build !cgo || osusergo

package workload

// cacheIDNames: os/user reads /etc/passwd and /etc/group itself, so names
// can be cached per version of those files (idnames.go).
const cacheIDNames = true

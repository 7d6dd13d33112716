//go:build cgo && !osusergo

package workload

// cacheIDNames: os/user asks NSS, whose sources may not be files: every
// call looks names up afresh.
const cacheIDNames = false

// Package execfeed is `lanyard-agent exec`: it runs a program that reads
// its certificate, key and bundle from paths (nginx, PostgreSQL, a JVM)
// and keeps those paths fed from the Workload API, with content that
// never touches a disk-backed file system.
//
// Exec is a Workload API client like any workload: it fetches the
// caller's X.509-SVID (and a JWT-SVID when asked) with go-spiffe's
// client, and never links the agent. The agent therefore attests the
// exec process, whose executable is lanyard-agent.
//
// Where the files live. When the process may create a mount namespace
// (root, or an unprivileged user namespace), the child is started in a
// private one (CLONE_NEWNS, / made private), in which a small tmpfs
// (0700, nosuid, nodev, noexec) is mounted on an empty directory: only
// the child and its descendants see the files, and the mount vanishes
// with the namespace's last process, so even a SIGKILL of exec leaves
// nothing behind. The child is first a stage of lanyard-agent itself
// (Stage): it mounts the tmpfs, hands exec a descriptor of its root over
// a socket, waits for the first files, then execs the command in place,
// keeping its PID. Exec writes every generation through that descriptor,
// which works across namespaces. Re-executing rather than unsharing a
// locked thread of exec is what makes this work unprivileged too: a user
// namespace can only be created by a single-threaded process, and the Go
// runtime never is one. Otherwise the files go to a fresh 0700 directory
// in a tmpfs ($XDG_RUNTIME_DIR, else /dev/shm, checked with statfs),
// removed on every exit path but not after a SIGKILL of exec.
//
// Rotation (Store.Switch): each generation is written to its own
// sub-directory, then one symlink, "current", is replaced by a rename, so
// cert, key, bundle and token change together at one instant; then the
// child is signalled; the previous generation is removed after a grace
// period. A reader that opens cert.pem before the switch and key.pem
// after it still gets a mixed pair: the signal is what tells it to read
// both again.
package execfeed

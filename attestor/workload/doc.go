// Package workload is workload attestation: it turns a caller of the
// Workload API, as the kernel reports it, into the selectors its entries
// are matched against. (attestor/node answers the other "who is this?":
// which machine the agent runs on.)
//
// A caller is pinned by a pidfd when its connection is accepted (Process,
// Identify, PinPID). Workload.Attest then derives unix:* selectors from the
// kernel's ids and /proc/<pid>/exe (path and a cached SHA-256), and
// systemd:unit, cgroup:path, container:id and k8s:pod-uid from
// /proc/<pid>/cgroup (ParseCgroup). Each family comes from a small attestor
// type that Config switches on or off. Attest reads /proc first and asks the
// pidfd last whether the caller still lives, so a PID recycled meanwhile
// cannot lend another process's selectors; Process.Recheck repeats the
// cheap part of that before every push on a stream. Every selector is
// written in the grammar of package selector, the one policy is checked
// against.
//
// The package exceeds the ~800-line guideline because pinning a caller and
// reading its selectors are one guarantee (the last pidfd check vouches for
// every read before it); each file stays small.
package workload

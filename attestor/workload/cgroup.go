package workload

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/lanyard-dev/lanyard/selector"
)

// CgroupInfo is what a process's cgroup membership says about it. Each
// field is empty when the membership does not say, and holds only values
// the selector grammar accepts.
type CgroupInfo struct {
	// Path is the process's cgroup in the hierarchy ParseCgroup chose.
	Path string
	// Unit is the systemd unit the system manager runs the process in:
	// the first unit below the slices at the top of Path. Anything deeper
	// was created inside that unit (by a user's systemd, a container
	// runtime, the service itself), which its owner may name at will.
	Unit string
	// ContainerID is the 64-hex ID of the container the process runs in,
	// when a root-owned runtime created its cgroup: a docker, containerd,
	// cri-o or podman scope that is Unit, or the cgroupfs layouts
	// /docker/<id> and /kubepods/[<qos>/]pod<uid>/<id>.
	ContainerID string
	// PodUID is the Kubernetes pod UID from kubelet's cgroups
	// (/kubepods.slice/... with the systemd driver, /kubepods/... with
	// cgroupfs), in its canonical dashed form.
	PodUID string
}

// Selectors returns the selectors c yields: cgroup:path, systemd:unit,
// container:id and k8s:pod-uid, for the fields that are set.
func (c CgroupInfo) Selectors() []string {
	var s []string
	for _, f := range [...]struct{ prefix, v string }{
		{selector.CgroupPath, c.Path},
		{selector.SystemdUnit, c.Unit},
		{selector.ContainerID, c.ContainerID},
		{selector.K8sPodUID, c.PodUID},
	} {
		if f.v != "" {
			s = append(s, f.prefix+f.v)
		}
	}
	return s
}

// ParseCgroup reads the content of /proc/<pid>/cgroup, in the cgroup v1,
// v2 or hybrid layout ("hierarchy-id:controllers:path" per line), and
// derives what the membership says.
//
// One hierarchy is chosen: the name=systemd hierarchy when there is one (v1
// and hybrid hosts: systemd places units there, and runc creates its
// cgroupfs containers there too), else the v2 unified hierarchy ("0::"),
// else pids, else memory, else the first listed. A path that does not
// lie inside the agent's cgroup namespace ("/../x") or that no selector
// could express yields nothing: the agent must run in the host's cgroup
// namespace, as a systemd unit does. A malformed line is an error.
func ParseCgroup(content []byte) (CgroupInfo, error) {
	var best string
	bestRank := -1
	for line := range strings.Lines(string(content)) {
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		id, rest, ok1 := strings.Cut(line, ":")
		ctrls, p, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 {
			return CgroupInfo{}, fmt.Errorf("parse cgroup: line %q: want id:controllers:path", line)
		}
		if _, err := strconv.ParseUint(id, 10, 32); err != nil {
			return CgroupInfo{}, fmt.Errorf("parse cgroup: line %q: hierarchy id: %w", line, err)
		}
		if !strings.HasPrefix(p, "/") {
			return CgroupInfo{}, fmt.Errorf("parse cgroup: line %q: path is not absolute", line)
		}
		if r := hierarchyRank(id, ctrls); r > bestRank {
			best, bestRank = p, r
		}
	}
	if bestRank < 0 {
		return CgroupInfo{}, errors.New("parse cgroup: no hierarchy listed")
	}
	if !selector.ValidValue(selector.CgroupPath, best) {
		return CgroupInfo{}, nil
	}
	info := CgroupInfo{Path: best}
	comps := strings.Split(strings.TrimPrefix(best, "/"), "/")
	info.Unit = systemdUnit(comps)
	info.PodUID, info.ContainerID = kubepods(comps)
	if info.ContainerID == "" {
		info.ContainerID = containerID(info.Unit, comps)
	}
	return info, nil
}

// hierarchyRank orders hierarchies by preference (higher is better); see
// ParseCgroup.
func hierarchyRank(id, ctrls string) int {
	rank := 0
	for c := range strings.SplitSeq(ctrls, ",") {
		switch {
		case c == "name=systemd":
			return 4
		case c == "pids":
			rank = max(rank, 2)
		case c == "memory":
			rank = max(rank, 1)
		}
	}
	if id == "0" && ctrls == "" {
		return 3
	}
	return rank
}

// systemdUnit returns the first component below the leading slices when it
// is a unit name.
func systemdUnit(comps []string) string {
	for _, c := range comps {
		if strings.HasSuffix(c, ".slice") {
			continue
		}
		if selector.ValidValue(selector.SystemdUnit, c) {
			return c
		}
		return ""
	}
	return ""
}

// containerScopePrefixes name the transient scopes container runtimes ask
// systemd for: docker, containerd's CRI plugin, cri-o, podman. Their conmon
// scopes ("crio-conmon-<id>.scope") hold a monitor, not the container, and
// do not match.
var containerScopePrefixes = [...]string{"docker-", "cri-containerd-", "crio-", "libpod-"}

// containerID finds the container ID in a systemd scope that is the unit,
// or in docker's cgroupfs layout /docker/<id>.
func containerID(unit string, comps []string) string {
	if name, ok := strings.CutSuffix(unit, ".scope"); ok {
		for _, pre := range containerScopePrefixes {
			if id, ok := strings.CutPrefix(name, pre); ok && selector.ValidValue(selector.ContainerID, id) {
				return id
			}
		}
	}
	if len(comps) >= 2 && comps[0] == "docker" && selector.ValidValue(selector.ContainerID, comps[1]) {
		return comps[1]
	}
	return ""
}

// kubepods finds the pod UID, and with the cgroupfs driver the container ID
// below it, in kubelet's default cgroup layout for the three QoS classes:
//
//	systemd:  /kubepods.slice/kubepods-pod<uid>.slice/...                                (guaranteed)
//	          /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/...     (burstable, besteffort)
//	cgroupfs: /kubepods/pod<uid>/<id>, /kubepods/<qos>/pod<uid>/<id>
//
// The systemd driver writes the UID's dashes as underscores (a dash
// separates slice levels); the selector uses the canonical dashed form.
// The systemd driver's container scope is the unit, found by containerID.
func kubepods(comps []string) (podUID, ctrID string) {
	if len(comps) < 2 {
		return "", ""
	}
	switch comps[0] {
	case "kubepods.slice":
		prefix, pod := "kubepods-pod", comps[1]
		if qos, ok := strings.CutSuffix(strings.TrimPrefix(comps[1], "kubepods-"), ".slice"); ok && isQoS(qos) {
			if len(comps) < 3 {
				return "", ""
			}
			prefix, pod = "kubepods-"+qos+"-pod", comps[2]
		}
		uid, ok1 := strings.CutPrefix(pod, prefix)
		uid, ok2 := strings.CutSuffix(uid, ".slice")
		if !ok1 || !ok2 || strings.Contains(uid, "-") {
			return "", ""
		}
		if uid = strings.ReplaceAll(uid, "_", "-"); !selector.ValidValue(selector.K8sPodUID, uid) {
			return "", ""
		}
		return uid, ""
	case "kubepods":
		i := 1
		if isQoS(comps[1]) {
			i = 2
		}
		if i >= len(comps) {
			return "", ""
		}
		uid, ok := strings.CutPrefix(comps[i], "pod")
		if !ok || !selector.ValidValue(selector.K8sPodUID, uid) {
			return "", ""
		}
		if i+1 < len(comps) {
			// containerd and docker name the container's cgroup by its
			// ID, cri-o by crio-<id>.
			c := strings.TrimPrefix(comps[i+1], "crio-")
			if selector.ValidValue(selector.ContainerID, c) {
				ctrID = c
			}
		}
		return uid, ctrID
	}
	return "", ""
}

func isQoS(s string) bool { return s == "burstable" || s == "besteffort" }

// cgroupAttestor derives the selectors /proc/<pid>/cgroup yields, for the
// families it is told to: systemd:unit, cgroup:path, container:id and
// k8s:pod-uid. One attestor reads the file once for all four.
type cgroupAttestor struct {
	unit, path, container, pod bool
}

func (a cgroupAttestor) selectors(c *caller) ([]string, error) {
	buf := procBufs.Get().(*[procFileSize]byte)
	defer procBufs.Put(buf)
	b, err := readProcFile(c.dir+"/cgroup", buf[:0])
	if err != nil {
		return nil, fmt.Errorf("read cgroup: %w", err)
	}
	// ParseCgroup's strings are its own copy, not slices of buf.
	info, err := ParseCgroup(b)
	if err != nil {
		return nil, err
	}
	if !a.path {
		info.Path = ""
	}
	if !a.unit {
		info.Unit = ""
	}
	if !a.container {
		info.ContainerID = ""
	}
	if !a.pod {
		info.PodUID = ""
	}
	return info.Selectors(), nil
}

package workload

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/selector"
)

const cgroupSamples = "../../testdata/cgroup"

// Container IDs and pod UIDs the samples use.
const (
	id0  = "5feceb66ffc86f38d952786c6d696c79c2dbc239dd4e91b46729d73a27fb57e9"
	id1  = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
	id2  = "d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35"
	id3  = "4e07408562bedb8b60ce05c1decfe3ad16b72230967de01f640b7e4729b49fce"
	id4  = "4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a"
	id5  = "ef2d127de37b942baad06145e54b0c619a1f22327b2ebbcfbec78f5564afe39d"
	id6  = "e7f6c011776e8db7cd330b54174fd76f7d0216b612387a5ffcfb81e6f0919683"
	id7  = "7902699be42c8a8e46fbbb4501726517e86b22c56a189f7625a6da49081b2451"
	pod0 = "cfcd2084-95d5-45ef-a6e7-dff9f98764da"
	pod1 = "c4ca4238-a0b9-4382-8dcc-509a6f75849b"
	pod2 = "c81e728d-9d4c-4f63-af06-7f89cc14862c"
	pod3 = "eccbc87e-4b5c-42fe-a830-8fd9f2a7baf3"
	pod4 = "a87ff679-a2f3-471d-9181-a67b7542122c"
)

// us writes a pod UID as the systemd cgroup driver does.
func us(uid string) string { return strings.ReplaceAll(uid, "-", "_") }

// TestParseCgroupSamples runs every sample in testdata/cgroup (each named
// for its runtime, driver and layout) and checks the selectors it yields.
func TestParseCgroupSamples(t *testing.T) {
	tests := []struct {
		file string
		want []string
	}{
		{"v2-systemd-service", []string{"cgroup:path:/system.slice/nginx.service", "systemd:unit:nginx.service"}},
		{"v2-systemd-template-escaped", []string{`cgroup:path:/system.slice/system-openvpn\x2dclient.slice/openvpn-client@work.service`, "systemd:unit:openvpn-client@work.service"}},
		// Below its unit, a service (Delegate=yes) names cgroups as it likes.
		{"v2-systemd-delegated-subgroup", []string{"cgroup:path:/system.slice/ci-runner.service/job-42", "systemd:unit:ci-runner.service"}},
		{"v2-systemd-user-session", []string{"cgroup:path:/user.slice/user-1000.slice/session-4.scope", "systemd:unit:session-4.scope"}},
		// A user's systemd can name a scope like a container runtime's:
		// the system unit is user@1000.service, and no container ID.
		{"v2-systemd-user-manager-spoof", []string{"cgroup:path:/user.slice/user-1000.slice/user@1000.service/app.slice/docker-" + id0 + ".scope", "systemd:unit:user@1000.service"}},
		{"v2-systemd-init", []string{"cgroup:path:/init.scope", "systemd:unit:init.scope"}},
		{"v2-root", []string{"cgroup:path:/"}},
		{"v2-outside-cgroup-namespace", nil},
		{"v2-docker-systemd", []string{"cgroup:path:/system.slice/docker-" + id0 + ".scope", "container:id:" + id0, "systemd:unit:docker-" + id0 + ".scope"}},
		{"v2-docker-cgroupfs", []string{"cgroup:path:/docker/" + id1, "container:id:" + id1}},
		{"v1-docker-cgroupfs", []string{"cgroup:path:/docker/" + id1, "container:id:" + id1}},
		{"v1-docker-systemd", []string{"cgroup:path:/system.slice/docker-" + id0 + ".scope", "container:id:" + id0, "systemd:unit:docker-" + id0 + ".scope"}},
		// The unified line shows containerd's cgroup; name=systemd the container's.
		{"hybrid-docker-cgroupfs", []string{"cgroup:path:/docker/" + id2, "container:id:" + id2}},
		{"hybrid-systemd-service", []string{"cgroup:path:/system.slice/ssh.service", "systemd:unit:ssh.service"}},
		// Taken from the sandbox these tests were written in: only the
		// memory hierarchy is below the root.
		{"hybrid-memory-controller-only", []string{"cgroup:path:/"}},
		// No name=systemd: the pids hierarchy decides.
		{"v1-openrc-docker-cgroupfs", []string{"cgroup:path:/docker/" + id3, "container:id:" + id3}},
		{"k8s-systemd-v2-containerd-burstable", []string{
			"cgroup:path:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + us(pod0) + ".slice/cri-containerd-" + id4 + ".scope",
			"container:id:" + id4, "k8s:pod-uid:" + pod0, "systemd:unit:cri-containerd-" + id4 + ".scope"}},
		{"k8s-systemd-v2-containerd-besteffort", []string{
			"cgroup:path:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + us(pod1) + ".slice/cri-containerd-" + id5 + ".scope",
			"container:id:" + id5, "k8s:pod-uid:" + pod1, "systemd:unit:cri-containerd-" + id5 + ".scope"}},
		{"k8s-systemd-v2-containerd-guaranteed", []string{
			"cgroup:path:/kubepods.slice/kubepods-pod" + us(pod2) + ".slice/cri-containerd-" + id6 + ".scope",
			"container:id:" + id6, "k8s:pod-uid:" + pod2, "systemd:unit:cri-containerd-" + id6 + ".scope"}},
		{"k8s-systemd-v2-crio-burstable", []string{
			"cgroup:path:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + us(pod3) + ".slice/crio-" + id7 + ".scope",
			"container:id:" + id7, "k8s:pod-uid:" + pod3, "systemd:unit:crio-" + id7 + ".scope"}},
		// conmon watches the container from its own scope: same pod, no container.
		{"k8s-systemd-v2-crio-conmon", []string{
			"cgroup:path:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + us(pod3) + ".slice/crio-conmon-" + id7 + ".scope",
			"k8s:pod-uid:" + pod3, "systemd:unit:crio-conmon-" + id7 + ".scope"}},
		{"k8s-systemd-v1-docker-besteffort", []string{
			"cgroup:path:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + us(pod4) + ".slice/docker-" + id0 + ".scope",
			"container:id:" + id0, "k8s:pod-uid:" + pod4, "systemd:unit:docker-" + id0 + ".scope"}},
		{"k8s-cgroupfs-v1-containerd-burstable", []string{"cgroup:path:/kubepods/burstable/pod" + pod0 + "/" + id1, "container:id:" + id1, "k8s:pod-uid:" + pod0}},
		{"k8s-cgroupfs-v1-containerd-guaranteed", []string{"cgroup:path:/kubepods/pod" + pod1 + "/" + id2, "container:id:" + id2, "k8s:pod-uid:" + pod1}},
		{"k8s-cgroupfs-v2-containerd-besteffort", []string{"cgroup:path:/kubepods/besteffort/pod" + pod2 + "/" + id3, "container:id:" + id3, "k8s:pod-uid:" + pod2}},
		{"k8s-cgroupfs-v2-crio-burstable", []string{"cgroup:path:/kubepods/burstable/pod" + pod3 + "/crio-" + id4, "container:id:" + id4, "k8s:pod-uid:" + pod3}},
		{"podman-rootful-v2", []string{"cgroup:path:/machine.slice/libpod-" + id5 + ".scope/container", "container:id:" + id5, "systemd:unit:libpod-" + id5 + ".scope"}},
		{"podman-rootful-v1", []string{"cgroup:path:/machine.slice/libpod-" + id5 + ".scope", "container:id:" + id5, "systemd:unit:libpod-" + id5 + ".scope"}},
		// Rootless containers live in the user's delegated tree, where the
		// user names the scopes: no container ID.
		{"podman-rootless-v2", []string{"cgroup:path:/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-" + id6 + ".scope/container", "systemd:unit:user@1000.service"}},
		{"podman-conmon-v2", []string{"cgroup:path:/machine.slice/libpod-conmon-" + id6 + ".scope", "systemd:unit:libpod-conmon-" + id6 + ".scope"}},
	}
	seen := map[string]bool{}
	for _, tc := range tests {
		seen[tc.file+".txt"] = true
		t.Run(tc.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(cgroupSamples, tc.file+".txt"))
			if err != nil {
				t.Fatal(err)
			}
			info, err := ParseCgroup(b)
			if err != nil {
				t.Fatalf("ParseCgroup: %v", err)
			}
			got := info.Selectors()
			slices.Sort(got)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("selectors (-want +got):\n%s", diff)
			}
			for _, s := range got {
				if err := selector.Validate(s); err != nil {
					t.Errorf("policy refuses a selector the agent produces: %v", err)
				}
			}
		})
	}
	files, err := filepath.Glob(filepath.Join(cgroupSamples, "*.txt"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !seen[filepath.Base(f)] {
			t.Errorf("sample %s has no expectation in this table", f)
		}
	}
}

func TestParseCgroupMalformed(t *testing.T) {
	tests := []struct {
		name, content, wantErr string
	}{
		{name: "empty", content: "", wantErr: "no hierarchy listed"},
		{name: "blank lines", content: "\n\n", wantErr: "no hierarchy listed"},
		{name: "two fields", content: "0:/system.slice\n", wantErr: "want id:controllers:path"},
		{name: "id not a number", content: "x::/system.slice\n", wantErr: "hierarchy id"},
		{name: "relative path", content: "0::system.slice\n", wantErr: "path is not absolute"},
		{name: "bad line among good ones", content: "1:name=systemd:/a.service\ngarbage\n", wantErr: "want id:controllers:path"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseCgroup([]byte(tc.content))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("ParseCgroup = %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

// TestParseCgroupPaths covers layouts and near misses one path at a time.
func TestParseCgroupPaths(t *testing.T) {
	tests := []struct {
		name, path string
		want       CgroupInfo
	}{
		{name: "path with a colon", path: "/system.slice/a:b.service", want: CgroupInfo{Path: "/system.slice/a:b.service", Unit: "a:b.service"}},
		{name: "control character yields nothing", path: "/system.slice/a\x01.service"},
		{name: "not clean", path: "/system.slice//a.service"},
		{name: "trailing slash", path: "/system.slice/"},
		{name: "slice only", path: "/system.slice", want: CgroupInfo{Path: "/system.slice"}},
		{name: "template is no unit", path: "/system.slice/web@.service", want: CgroupInfo{Path: "/system.slice/web@.service"}},
		{name: "container ID too short", path: "/system.slice/docker-abc.scope", want: CgroupInfo{Path: "/system.slice/docker-abc.scope", Unit: "docker-abc.scope"}},
		{name: "container ID upper case", path: "/docker/" + strings.ToUpper(id0), want: CgroupInfo{Path: "/docker/" + strings.ToUpper(id0)}},
		{name: "container scope as a service", path: "/system.slice/docker-" + id0 + ".service", want: CgroupInfo{Path: "/system.slice/docker-" + id0 + ".service", Unit: "docker-" + id0 + ".service"}},
		{name: "nested docker keeps the outer ID", path: "/docker/" + id0 + "/docker/" + id1, want: CgroupInfo{Path: "/docker/" + id0 + "/docker/" + id1, ContainerID: id0}},
		{name: "kubepods root alone", path: "/kubepods", want: CgroupInfo{Path: "/kubepods"}},
		{name: "kubepods qos alone", path: "/kubepods/burstable", want: CgroupInfo{Path: "/kubepods/burstable"}},
		{name: "pod without container", path: "/kubepods/pod" + pod0, want: CgroupInfo{Path: "/kubepods/pod" + pod0, PodUID: pod0}},
		{name: "pod UID upper case", path: "/kubepods/pod" + strings.ToUpper(pod0), want: CgroupInfo{Path: "/kubepods/pod" + strings.ToUpper(pod0)}},
		{name: "unknown qos class", path: "/kubepods/gold/pod" + pod0, want: CgroupInfo{Path: "/kubepods/gold/pod" + pod0}},
		{name: "systemd pod slice with dashes", path: "/kubepods.slice/kubepods-pod" + pod0 + ".slice", want: CgroupInfo{Path: "/kubepods.slice/kubepods-pod" + pod0 + ".slice"}},
		{name: "systemd qos slice mismatch", path: "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod" + us(pod0) + ".slice", want: CgroupInfo{Path: "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod" + us(pod0) + ".slice"}},
		{name: "systemd qos slice alone", path: "/kubepods.slice/kubepods-burstable.slice", want: CgroupInfo{Path: "/kubepods.slice/kubepods-burstable.slice"}},
		{name: "kubepods below another root", path: "/user.slice/kubepods/pod" + pod0 + "/" + id0, want: CgroupInfo{Path: "/user.slice/kubepods/pod" + pod0 + "/" + id0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseCgroup([]byte("0::" + tc.path + "\n"))
			if err != nil {
				t.Fatalf("ParseCgroup: %v", err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("CgroupInfo (-want +got):\n%s", diff)
			}
		})
	}
}

// FuzzParseCgroup: the parser never panics, and every selector it yields
// is one the policy accepts, so no derived selector is silently unmatchable.
func FuzzParseCgroup(f *testing.F) {
	files, err := filepath.Glob(filepath.Join(cgroupSamples, "*.txt"))
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("0::/kubepods.slice/kubepods-pod" + us(pod0) + ".slice/crio-" + id0 + ".scope\n"))
	f.Add([]byte("1:name=systemd:/a\xff.service\n0::/\n"))
	f.Fuzz(func(t *testing.T, content []byte) {
		info, err := ParseCgroup(content)
		if err != nil {
			if info != (CgroupInfo{}) {
				t.Fatalf("error %v with a non-empty result %+v", err, info)
			}
			return
		}
		for _, s := range info.Selectors() {
			if err := selector.Validate(s); err != nil {
				t.Fatalf("ParseCgroup(%q) yields a selector the policy refuses: %v", content, err)
			}
		}
		if info.Path == "" && info != (CgroupInfo{}) {
			t.Fatalf("facts without a path: %+v", info)
		}
		if info.Path != "" && !bytes.Contains(content, []byte(info.Path)) {
			t.Fatalf("path %q is not in the input", info.Path)
		}
	})
}

// TestParseCgroupCopies: what ParseCgroup returns keeps no slice of its
// input, so the cgroup attestor may give its pooled buffer back (procBufs)
// as soon as the file is parsed.
func TestParseCgroupCopies(t *testing.T) {
	content := []byte("0::/kubepods.slice/kubepods-pod" + us(pod0) + ".slice/cri-containerd-" + id0 + ".scope\n")
	info, err := ParseCgroup(content)
	if err != nil {
		t.Fatal(err)
	}
	if info.Path == "" || info.Unit == "" || info.ContainerID == "" || info.PodUID == "" {
		t.Fatalf("sample yields %+v, want every field set", info)
	}
	want := CgroupInfo{
		Path:        strings.Clone(info.Path),
		Unit:        strings.Clone(info.Unit),
		ContainerID: strings.Clone(info.ContainerID),
		PodUID:      strings.Clone(info.PodUID),
	}
	for i := range content {
		content[i] = 'x'
	}
	if diff := cmp.Diff(want, info); diff != "" {
		t.Errorf("CgroupInfo changed with its input (-before +after):\n%s", diff)
	}
}

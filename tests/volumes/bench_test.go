//go:build bench

package volumes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
)

const benchVolumes = 10000

// pythonPlugin is the smallest Python 3 SMAPIv3 volume plugin doing the
// same work as ours for SR.ls and Volume.stat (read the records, stat the
// leaf files, print the volume records): the reference for per-call cost,
// since every XCP-ng SMAPIv3 plugin is Python.
const pythonPlugin = `#!/usr/bin/python3
import sys, os, json
def vol(sr, n):
    path = os.path.join(sr, n["id"] + "." + n["format"])
    try:
        phys = os.stat(path).st_blocks * 512
    except OSError:
        phys = 0
    v = n["vdi"]
    return {"key": n["id"], "uuid": n["id"], "name": v["name"], "description": v["description"],
            "read_write": v["read_write"], "sharable": v["sharable"], "virtual_size": n["virtual_size"],
            "physical_utilisation": phys, "uri": ["luksext://" + path], "keys": v.get("keys") or {}}
def main():
    method = os.path.basename(sys.argv[0])
    p = json.load(sys.stdin)
    sr = p["sr"]
    nodes = os.path.join(sr, ".luksext", "nodes")
    if method == "SR.ls":
        out = []
        for f in os.listdir(nodes):
            with open(os.path.join(nodes, f)) as fh:
                n = json.load(fh)
            if n.get("vdi"):
                out.append(vol(sr, n))
        print(json.dumps(out))
    elif method == "Volume.stat":
        with open(os.path.join(nodes, p["key"] + ".json")) as fh:
            print(json.dumps(vol(sr, json.load(fh))))
main()
`

func repoRoot(t *testing.T) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func median(d []time.Duration) time.Duration {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[len(d)/2]
}

// timeCalls returns the median wall time and the median CPU time (user +
// system of the child) of n calls. CPU time is the steadier figure on a
// loaded machine, where wall time also counts waiting for a core.
func timeCalls(t *testing.T, exe, method string, params []byte, n int) (time.Duration, time.Duration) {
	var ds, cpu []time.Duration
	for i := 0; i < n; i++ {
		cmd := exec.Command(exe, "--json")
		cmd.Stdin = bytes.NewReader(params)
		// The reply is read into a buffer grown once, the same for both
		// plugins: SR.ls's 3.5 MB through a buffer that doubles as it
		// fills would add its copies (on the same two cores) to the time
		// of whichever plugin is measured.
		var out bytes.Buffer
		out.Grow(8 << 20)
		cmd.Stdout = &out
		start := time.Now()
		err := cmd.Run()
		ds = append(ds, time.Since(start))
		require.NoError(t, err, "%s: %s", exe, out.String())
		require.NotEmpty(t, out.Bytes())
		cpu = append(cpu, cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime())
	}
	return median(ds), median(cpu)
}

// TestBenchVolumeCalls measures SR.ls and Volume.stat at 10 000 volumes
// through the real volume executable (one process per call, as
// xapi-storage-script runs it) next to a minimal Python 3 plugin doing the
// same reads.
func TestBenchVolumeCalls(t *testing.T) {
	py := testenv.Tools(t, "python3")["python3"]
	// the interpreter itself, not a version manager's shell shim in PATH
	// (dom0 runs /usr/bin/python3 directly)
	if exe, err := exec.Command(py, "-c", "import sys; print(sys.executable)").Output(); err == nil && len(bytes.TrimSpace(exe)) > 0 {
		py = string(bytes.TrimSpace(exe))
	}
	goBin := testenv.Tools(t, "go")["go"]
	dir := t.TempDir()
	bin := filepath.Join(dir, "volume")
	// built as `make build` builds the installed binary (stripped)
	build := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "./volume")
	build.Dir = repoRoot(t)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "%s", out)

	ours, ref := filepath.Join(dir, "ours"), filepath.Join(dir, "python")
	for _, d := range []string{ours, ref} {
		require.NoError(t, os.MkdirAll(d, 0o755))
	}
	// Python plugins are one file per method (or symlinks to one file):
	// the method is the basename of argv[0], as for our binary.
	script := "#!" + py + "\n" + pythonPlugin[len("#!/usr/bin/python3\n"):]
	for _, m := range []string{"SR.ls", "Volume.stat"} {
		require.NoError(t, os.Symlink(bin, filepath.Join(ours, m)))
		require.NoError(t, os.WriteFile(filepath.Join(ref, m), []byte(script), 0o755))
	}

	// An SR with 10 000 volumes: records written directly (same format as
	// the store writes) and small sparse leaf files, to keep setup short.
	sr := attachedSR(t, 512, 40000)
	st := store.New(sr)
	require.NoError(t, os.MkdirAll(st.Path("nodes"), 0o700))
	var key string
	for i := 0; i < benchVolumes; i++ {
		n := store.Node{Schema: store.Schema, ID: store.NewID(), Format: store.FormatVHD, VirtualSize: 8 << 20,
			VDI: &store.VDI{Name: fmt.Sprintf("vol-%d", i), ReadWrite: true, Keys: map[string]string{"vdi-type": "user"}}}
		b, _ := json.Marshal(n)
		require.NoError(t, os.WriteFile(st.Path("nodes", n.ID+".json"), b, 0o600))
		f, err := os.Create(st.ImagePath(n))
		require.NoError(t, err)
		require.NoError(t, f.Truncate(4<<20))
		f.Close()
		key = n.ID
	}
	ls, _ := json.Marshal(map[string]any{"dbg": "bench", "sr": sr})
	stat, _ := json.Marshal(map[string]any{"dbg": "bench", "sr": sr, "key": key})

	// results must agree before we time them
	var a, b []map[string]any
	o1, err := exec.Command("sh", "-c", fmt.Sprintf("echo '%s' | %s --json", ls, filepath.Join(ours, "SR.ls"))).Output()
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(o1, &a))
	o2, err := exec.Command("sh", "-c", fmt.Sprintf("echo '%s' | %s --json", ls, filepath.Join(ref, "SR.ls"))).Output()
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(o2, &b))
	require.Len(t, a, benchVolumes)
	require.Len(t, b, benchVolumes)

	env := os.Getenv("LUKSEXT_LOG_LEVEL")
	os.Setenv("LUKSEXT_LOG_LEVEL", "warn")
	defer os.Setenv("LUKSEXT_LOG_LEVEL", env)
	for _, c := range []struct {
		method string
		params []byte
		n      int
	}{{"SR.ls", ls, 7}, {"Volume.stat", stat, 41}} {
		g, gc := timeCalls(t, filepath.Join(ours, c.method), c.method, c.params, c.n)
		p, pc := timeCalls(t, filepath.Join(ref, c.method), c.method, c.params, c.n)
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		fmt.Printf("BENCH %s at %d volumes (exec per call, median of %d): luksext %.1f ms, python3 reference %.1f ms, ratio %.2f\n",
			c.method, benchVolumes, c.n, ms(g), ms(p), float64(g)/float64(p))
		fmt.Printf("BENCH %s at %d volumes, CPU time (user+system, median of %d): luksext %.1f ms, python3 reference %.1f ms, ratio %.2f\n",
			c.method, benchVolumes, c.n, ms(gc), ms(pc), float64(gc)/float64(pc))
	}

	// The listing cache is stale (the first SR.ls after a volume change
	// rebuilds it from the records), and the first SR.ls after an attach:
	// the SR's file system freshly mounted (no inode, dentry or page of it
	// cached), for both plugins.
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	last, err := st.Get(key)
	require.NoError(t, err)
	var stale, restat []time.Duration
	for i := 0; i < 5; i++ {
		require.NoError(t, st.Put(last)) // a record change: the caches are stale
		g, _ := timeCalls(t, filepath.Join(ours, "SR.ls"), "SR.ls", ls, 1)
		stale = append(stale, g)
		// a VM stopped (its datapath teardown invalidates the cached
		// allocations): every leaf is stat'ed again, records reused
		require.NoError(t, st.InvalidateAllocation())
		g, _ = timeCalls(t, filepath.Join(ours, "SR.ls"), "SR.ls", ls, 1)
		restat = append(restat, g)
	}
	g := median(stale)
	fmt.Printf("BENCH SR.ls at %d volumes, listing cache stale (rebuilt from the records; median of 5): luksext %.1f ms\n", benchVolumes, ms(g))
	g = median(restat)
	fmt.Printf("BENCH SR.ls at %d volumes, cached allocations invalidated (a VM stopped; every leaf stat'ed; median of 5): luksext %.1f ms\n", benchVolumes, ms(g))

	// Volumes attached to VMs are stat'ed at every call: their datapath
	// records (as Datapath.attach writes them, in the datapath's state
	// directory on tmpfs) name them.
	const attached = 100
	nodes, err := st.List()
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(attachment.DefaultDir, 0o700))
	for _, n := range nodes[:attached] {
		rec := filepath.Join(attachment.DefaultDir, n.File()+"-00000000bench000.json")
		require.NoError(t, os.WriteFile(rec, []byte(`{"schema":1,"image":{"type":"vhd","path":"`+st.ImagePath(n)+`"},"minor":-1,"domains":{}}`), 0o600))
		t.Cleanup(func() { os.Remove(rec) })
	}
	g, gc := timeCalls(t, filepath.Join(ours, "SR.ls"), "SR.ls", ls, 7)
	fmt.Printf("BENCH SR.ls at %d volumes, %d of them attached (stat'ed at every call; exec, median of 7): luksext %.1f ms\n", benchVolumes, attached, ms(g))
	fmt.Printf("BENCH SR.ls at %d volumes, %d of them attached, CPU time (user+system, median of 7): luksext %.1f ms\n", benchVolumes, attached, ms(gc))
	var cold, coldPy []time.Duration
	for i := 0; i < 3; i++ {
		remount(t, sr)
		g, _ := timeCalls(t, filepath.Join(ours, "SR.ls"), "SR.ls", ls, 1)
		cold = append(cold, g)
		remount(t, sr)
		p, _ := timeCalls(t, filepath.Join(ref, "SR.ls"), "SR.ls", ls, 1)
		coldPy = append(coldPy, p)
	}
	g, p := median(cold), median(coldPy)
	fmt.Printf("BENCH SR.ls at %d volumes, first call after a fresh mount (median of 3): luksext %.1f ms, python3 reference %.1f ms, ratio %.2f\n",
		benchVolumes, ms(g), ms(p), float64(g)/float64(p))
	_ = luksext.PluginName
}

// remount unmounts and mounts again the file system at mnt, as a detach
// and an attach do: nothing of it stays in the kernel's caches.
func remount(t *testing.T, mnt string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	require.NoError(t, err)
	real, err := filepath.EvalSymlinks(mnt) // /var/run is a link to /run
	require.NoError(t, err)
	var src string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 2 && (f[1] == mnt || f[1] == real) {
			src = f[0]
		}
	}
	require.NotEmpty(t, src, "%s is mounted", mnt)
	tools := testenv.Tools(t, "mount", "umount")
	out, err := exec.Command(tools["umount"], mnt).CombinedOutput()
	require.NoError(t, err, "%s", out)
	out, err = exec.Command(tools["mount"], "-t", "ext4", src, mnt).CombinedOutput()
	require.NoError(t, err, "%s", out)
	// as SR.attach does after its mount: SR.ls stats every leaf again
	require.NoError(t, store.New(mnt).InvalidateAllocation())
}

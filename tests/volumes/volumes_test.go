// Package volumes tests the luksext volume layer end to end on a plain
// directory: snapshot/clone trees written with guest data, the garbage
// collector coalescing them (also when killed with SIGKILL at each step),
// and every chain checked block by block with libvhdi (python3-libvhdi),
// an implementation independent of ours.
package volumes

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/luksexttest"
)

const (
	mib     = 1 << 20
	volSize = 8 * mib
	crashAt = "VOLUMES_TEST_GC_CRASH_AT"
)

func quietLog() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	l.SetLevel(logrus.WarnLevel)
	return l
}

// TestMain doubles as a GC that kills itself at a chosen step (the
// library, in process, with a fault hook). It never answers the volume
// binary's own modes (`gc`, methods, operator command): tests that need
// them exec the binary built from ./volume (volumeBinary), as StartGC and
// xapi-storage-script do.
func TestMain(m *testing.M) {
	if spec := os.Getenv(liveCrashEnv); spec != "" {
		os.Exit(liveCrashHelper(spec))
	}
	if spec := os.Getenv(crashAt); spec != "" {
		sr, step, _ := strings.Cut(spec, "|")
		err := luksext.CollectOnce(context.Background(), sr, luksext.VolumeDeps{}, func(s string) {
			if s == step {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		}, quietLog())
		fmt.Fprintln(os.Stderr, "GC was not killed; error:", err)
		os.Exit(3)
	}
	code := m.Run()
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	os.Exit(code)
}

var (
	buildOnce sync.Once
	builtDir  string
	builtBin  string
	buildErr  error
)

func repoRootDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// volumeBinary builds ./volume once per test run (static, as `make build`
// does) and returns its path.
func volumeBinary(t *testing.T) string {
	t.Helper()
	goBin := testenv.Tools(t, "go")["go"]
	buildOnce.Do(func() {
		builtDir, buildErr = os.MkdirTemp("", "luksext-volume-bin-")
		if buildErr != nil {
			return
		}
		builtBin = filepath.Join(builtDir, "volume")
		cmd := exec.Command(goBin, "build", "-trimpath", "-o", builtBin, "./volume")
		cmd.Dir = repoRootDir()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./volume: %w: %s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return builtBin
}

type sr struct {
	t     *testing.T
	dir   string
	ctx   *smapitest.Ctx
	model map[string][]byte // expected guest-visible content per volume
	// the datapath: tapdisk modelled by tapdiskfake behind tap-ctl
	blktap *tapdiskfake.Blktap
	tapctl *runfake.Runner
	dp     *attachment.Manager
	// handles accepts dir as a mounted SR (luksexttest)
	handles luksext.SRCheck
}

func newSR(t *testing.T) *sr {
	fake := luksexttest.NewSR(t) // an SR directory listed as mounted from its mapping
	return newSRAt(t, fake.Path, fake.Check())
}

// newSRAt is newSR on the SR mounted at dir, whose handles handles checks.
func newSRAt(t *testing.T, dir string, handles luksext.SRCheck) *sr {
	s := &sr{t: t, dir: dir, handles: handles, model: map[string][]byte{}}
	s.tapctl = runfake.New()
	s.blktap = tapdiskfake.New(s.tapctl)
	s.dp = &attachment.Manager{Ctl: tapdisk.Ctl{Runner: s.tapctl}, Dir: filepath.Join(t.TempDir(), "datapath"), Log: quietLog(),
		Closed: luksext.ImageClosed} // as the datapath plugin's
	table := luksext.VolumeTable(luksext.Deps{Paths: run.DefaultPaths, Volumes: s.deps()})
	inv := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: quietLog()}}
	s.ctx = &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: inv, Table: table}}
	return s
}

// deps are the volume layer's edges: real images, the fake datapath.
func (s *sr) deps() luksext.VolumeDeps {
	return luksext.VolumeDeps{Images: image.Files{Runner: run.NewExec(quietLog())}, Datapath: s.dp,
		InUse: s.dp.InUseUnder, Handles: s.handles}
}

func (s *sr) call(method string, out any, kv ...any) {
	s.t.Helper()
	p := map[string]any{"dbg": "volumes-test", "sr": s.dir}
	for i := 0; i+1 < len(kv); i += 2 {
		p[kv[i].(string)] = kv[i+1]
	}
	s.ctx.MustSucceed(method, p, out)
}

func (s *sr) create(name string) string {
	var v smapi.Volume
	s.call("Volume.create", &v, "name", name, "description", "", "size", volSize, "sharable", false)
	s.model[v.Key] = make([]byte, volSize)
	return v.Key
}

func (s *sr) snapshot(method, key string) string {
	var v smapi.Volume
	s.call(method, &v, "key", key)
	s.model[v.Key] = bytes.Clone(s.model[key])
	return v.Key
}

func (s *sr) destroy(key string) {
	s.call("Volume.destroy", nil, "key", key)
	delete(s.model, key)
}

func (s *sr) leaf(key string) string {
	var v smapi.Volume
	s.call("Volume.stat", &v, "key", key)
	require.Len(s.t, v.URI, 1)
	return strings.TrimPrefix(v.URI[0], luksext.URIScheme+"://")
}

// write puts random guest data into a volume, as tapdisk would, through
// our VHD writer; libvhdi later reads it back.
func (s *sr) write(key string, off, n int64) {
	s.t.Helper()
	data := make([]byte, n)
	_, _ = rand.Read(data)
	img, err := vhd.Open(s.leaf(key), true)
	require.NoError(s.t, err)
	_, err = img.WriteAt(data, off)
	require.NoError(s.t, err)
	require.NoError(s.t, img.Close())
	copy(s.model[key][off:], data)
}

func (s *sr) chain(key string) []string {
	c, err := vhd.OpenChain(s.leaf(key))
	require.NoError(s.t, err)
	defer c.Close()
	var out []string
	for _, i := range c.Images {
		out = append(out, i.Path())
	}
	return out
}

// verify reads every volume through libvhdi and compares block by block.
func (s *sr) verify(what string) {
	s.t.Helper()
	for key, want := range s.model {
		chain := s.chain(key)
		got := pyvhdiRead(s.t, chain)
		require.Len(s.t, got, len(want), "%s: %s", what, key)
		for b := 0; b < len(want); b += vhd.BlockSize {
			if !bytes.Equal(want[b:b+vhd.BlockSize], got[b:b+vhd.BlockSize]) {
				s.t.Errorf("%s: volume %s block %d differs when read by libvhdi through chain %v", what, key, b/vhd.BlockSize, chain)
			}
		}
	}
}

func (s *sr) images() []string {
	m, _ := filepath.Glob(filepath.Join(s.dir, "*.vhd"))
	return m
}

func pyvhdiRead(t *testing.T, chain []string) []byte {
	t.Helper()
	py := "/usr/bin/python3"
	if _, err := os.Stat(py); err != nil {
		py = testenv.Tools(t, "python3")["python3"]
	}
	script := `
import sys, pyvhdi
files = []
for p in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
leaf = files[0]
sys.stdout.buffer.write(leaf.read(leaf.get_media_size()))
`
	out, err := exec.Command(py, append([]string{"-c", script}, chain...)...).Output()
	if ee, ok := err.(*exec.ExitError); ok && strings.Contains(string(ee.Stderr), "No module named 'pyvhdi'") {
		testenv.Unavailable(t, "python3-libvhdi is not installed")
	}
	require.NoError(t, err)
	return out
}

// buildTree makes: A written, snapshot S1, A written, clone C1, A and C1
// written, S1 destroyed. The tree is then base1 -> base2 -> {A, C1}, where
// base2 is the only child of base1: a coalesce candidate.
func buildTree(t *testing.T) (*sr, string, string) {
	s := newSR(t)
	a := s.create("A")
	s.write(a, 0, 3*mib)
	s1 := s.snapshot("Volume.snapshot", a)
	s.write(a, 1*mib, 2*mib+4096)
	c1 := s.snapshot("Volume.clone", a)
	s.write(a, 5*mib, 512)
	s.write(c1, 6*mib-4096, 8192)
	s.verify("before GC")
	require.Len(t, s.chain(a), 3)
	s.destroy(s1)
	s.verify("after destroying the snapshot")
	return s, a, c1
}

func TestSnapshotCloneAndGCKeepEveryBlock(t *testing.T) {
	s, a, c1 := buildTree(t)
	require.Len(t, s.images(), 4, "base1, base2, A, C1")
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	s.verify("after coalesce")
	assert.Len(t, s.chain(a), 2, "base2 coalesced into base1")
	assert.Len(t, s.chain(c1), 2)
	assert.Len(t, s.images(), 3)

	s.destroy(c1)
	s.destroy(a)
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	assert.Empty(t, s.images(), "bases nothing uses are deleted")
}

// A GC killed with SIGKILL after each step of a coalesce, then run again,
// ends with the same tree and the same data.
func TestGCKilledAtEachStepLosesNothing(t *testing.T) {
	testenv.Tools(t, "vhdiinfo") // libvhdi present
	for _, step := range []string{"journalled", "copied", "reparented", "deleted"} {
		t.Run(step, func(t *testing.T) {
			s, a, c1 := buildTree(t)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashAt+"="+s.dir+"|"+step)
			err := cmd.Run()
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee)
			ws := ee.Sys().(syscall.WaitStatus)
			require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "the GC died by SIGKILL at %s (status %v)", step, ws)
			s.verify("right after the kill")

			require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
			s.verify("after recovery")
			assert.Len(t, s.chain(a), 2)
			assert.Len(t, s.chain(c1), 2)
			assert.Len(t, s.images(), 3)
			_, err = os.Stat(filepath.Join(s.dir, store.MetaDir, "gc", "journal.json"))
			assert.ErrorIs(t, err, os.ErrNotExist, "journal finished")
		})
	}
}

// StartGC (the path SR.attach takes) runs `volume gc <sr>` of the real
// volume binary as a detached process, which, on its own, coalesces the
// chain and removes an unused hidden base, an image file without a record
// and a temporary image left by a crash; StopGC ends it.
func TestStartAndStopGC(t *testing.T) {
	bin := volumeBinary(t)
	s, a, _ := buildTree(t)
	// an unused hidden base: a volume snapshotted, then both destroyed
	x := s.create("X")
	s.write(x, 0, 4096)
	xs := s.snapshot("Volume.snapshot", x)
	s.destroy(xs)
	s.destroy(x)
	// a crashed create's image and a crashed snapshot's temporary image,
	// old enough for the GC to know no call is still writing them
	orphan := filepath.Join(s.dir, store.NewID()+".vhd")
	tmp := filepath.Join(s.dir, ".tmp-"+store.NewID()+".vhd")
	for _, f := range []string{orphan, tmp} {
		require.NoError(t, os.WriteFile(f, []byte("left by a crash"), 0o600))
		old := time.Now().Add(-time.Hour)
		require.NoError(t, os.Chtimes(f, old, old))
	}
	require.Len(t, s.images(), 4+2+1, "base1, base2, A, C1, X's base, the orphan, and the .tmp (hidden name)")

	t.Setenv(luksext.GCIntervalEnv, "200ms") // product knob, inherited by the detached GC
	require.NoError(t, luksext.StartGCFrom(bin, s.dir))
	require.NoError(t, luksext.StartGCFrom(bin, s.dir), "idempotent")
	gone := func(p string) bool { _, err := os.Stat(p); return os.IsNotExist(err) }
	// Read without the SR lock while the GC runs: between two steps of a
	// re-parent the chain may not open (a child already naming its new
	// parent); that is "not yet", not a failure.
	chainLen := func(key string) int {
		c, err := vhd.OpenChain(s.leaf(key))
		if err != nil {
			return -1
		}
		defer c.Close()
		return len(c.Images)
	}
	require.Eventually(t, func() bool {
		return chainLen(a) == 2 && gone(orphan) && gone(tmp) && len(s.images()) == 3
	}, 60*time.Second, 100*time.Millisecond, "the background GC coalesced and collected (images now: %v)", s.images())
	require.NoError(t, luksext.StopGC(s.dir, 10*time.Second))
	require.NoError(t, luksext.StopGC(s.dir, 10*time.Second), "idempotent")
	s.verify("after the background GC")
}

// The snapshot chain is bounded.
func TestChainDepthIsBounded(t *testing.T) {
	s := newSR(t)
	a := s.create("deep")
	for i := 1; i < luksext.MaxChainDepth; i++ {
		s.snapshot("Volume.snapshot", a)
	}
	p := map[string]any{"dbg": "t", "sr": s.dir, "key": a}
	s.ctx.ExpectError("Volume.snapshot", p, "In_use")
}

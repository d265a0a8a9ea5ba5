package volumes

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

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
)

// lvioRead reads the whole virtual disk of the chain ending at leaf with
// blktap's libvhd (lvio from ../shared/dom0/blktap: parents followed,
// partly written blocks right), an oracle independent of plugins/vhd.
func lvioRead(t *testing.T, leaf string) []byte {
	t.Helper()
	lvio := filepath.Join(repoRootDir(), "..", "shared", "dom0", "blktap", "bin", "lvio")
	if _, err := os.Stat(lvio); err != nil {
		testenv.Unavailable(t, "blktap's lvio is not at "+lvio+" (see shared/dom0/README.md)")
	}
	out := filepath.Join(t.TempDir(), "disk")
	b, err := exec.Command(lvio, "read", leaf, out).CombinedOutput()
	require.NoError(t, err, "lvio read %s: %s", leaf, b)
	data, err := os.ReadFile(out)
	require.NoError(t, err)
	return data
}

// vm models a running VM's disk the way tapdisk serves it: the leaf is
// held open by file descriptor (a rename does not redirect its writes),
// closed while tapdisk is paused and reopened by path when tapdisk
// reopens it (tapdiskfake's Opens changes on open and unpause). Every
// write is mirrored in a raw shadow of the disk.
type vm struct {
	t      *testing.T
	s      *sr
	key    string
	path   string
	minor  int
	img    *vhd.Image
	opens  int
	shadow []byte
}

func (s *sr) start(key string) *vm {
	s.t.Helper()
	path := s.leaf(key)
	img := tapdisk.Image{Type: "vhd", Path: path}
	ctx := context.Background()
	_, err := s.dp.Attach(ctx, img, "5")
	require.NoError(s.t, err)
	require.NoError(s.t, s.dp.Activate(ctx, img, "5", false))
	m := &vm{t: s.t, s: s, key: key, path: path, minor: -1, shadow: bytes.Clone(s.model[key])}
	for n, mi := range s.blktap.Minors() {
		if mi.Path == path {
			m.minor = n
		}
	}
	require.GreaterOrEqual(s.t, m.minor, 0)
	m.sync()
	return m
}

// sync follows tapdisk: closed while paused, reopened by path after an
// open or unpause.
func (m *vm) sync() {
	m.t.Helper()
	mi := m.s.blktap.Minors()[m.minor]
	if mi.Paused || mi.Opens != m.opens {
		if m.img != nil {
			require.NoError(m.t, m.img.Close())
			m.img = nil
		}
	}
	if !mi.Paused && m.img == nil {
		img, err := vhd.Open(mi.Path, true)
		require.NoError(m.t, err)
		m.img, m.opens = img, mi.Opens
	}
}

// write puts random data into 512-byte sectors scattered over the disk,
// each inside a 2 MiB block most of which stays unwritten (partial
// blocks: the parent's data must show through around them).
func (m *vm) write(round int) {
	m.t.Helper()
	m.sync()
	_, err := m.s.blktap.Write(m.minor)
	require.NoError(m.t, err, "the VM's disk must not be paused")
	for b := int64(0); b < volSize/vhd.BlockSize; b++ {
		off := b*vhd.BlockSize + int64((round*7+int(b)*3)%4096)*512
		sector := make([]byte, 512)
		_, _ = rand.Read(sector)
		_, err := m.img.WriteAt(sector, off)
		require.NoError(m.t, err)
		copy(m.shadow[off:], sector)
	}
}

// stop shuts the VM down: tapdisk closes the leaf, the datapath tears
// it down.
func (m *vm) stop() {
	m.t.Helper()
	if m.img != nil {
		require.NoError(m.t, m.img.Close())
		m.img = nil
	}
	require.NoError(m.t, m.s.dp.Detach(context.Background(), tapdisk.Image{Type: "vhd", Path: m.path}, "5"))
	m.s.model[m.key] = m.shadow
}

func (m *vm) requirePaused(paused bool) {
	m.t.Helper()
	require.Equal(m.t, paused, m.s.blktap.Minors()[m.minor].Paused)
}

// checkDisk compares what libvhd reads through key's chain with want.
func (s *sr) checkDisk(what, key string, want []byte) {
	s.t.Helper()
	got := lvioRead(s.t, s.leaf(key))
	require.Len(s.t, got, len(want), what)
	for b := 0; b < len(want); b += vhd.BlockSize {
		if !bytes.Equal(want[b:b+vhd.BlockSize], got[b:b+vhd.BlockSize]) {
			s.t.Fatalf("%s: volume %s block %d differs when read by libvhd through chain %v", what, key, b/vhd.BlockSize, s.chain(key))
		}
	}
}

func (s *sr) journals() []string {
	m, _ := filepath.Glob(filepath.Join(s.dir, store.MetaDir, "journal", "*.json"))
	g, _ := filepath.Glob(filepath.Join(s.dir, store.MetaDir, "gc", "journal.json"))
	return append(m, g...)
}

func (s *sr) mutations() []string {
	var out []string
	for _, c := range s.tapctl.Calls() {
		if c.Args[0] != "list" {
			out = append(out, c.Line())
		}
	}
	return out
}

// A snapshot of a running VM's disk is point-in-time: the tapdisk is
// paused around the renames, the VM goes on writing to its (new) leaf,
// and the snapshot never changes. Then the GC, after the snapshot is
// deleted, coalesces the leaf into its base with the VM paused, and the
// VM's disk stays whole.
func TestLiveSnapshotIsFrozenAndVMWritesToItsLeaf(t *testing.T) {
	s := newSR(t)
	a := s.create("A")
	m := s.start(a)
	m.write(0)
	var snaps []string
	var frozen [][]byte
	for i := 1; i <= 3; i++ {
		snap := s.snapshot("Volume.snapshot", a)
		m.requirePaused(false)
		snaps, frozen = append(snaps, snap), append(frozen, bytes.Clone(m.shadow))
		m.write(i)
	}
	assert.Contains(t, s.mutations(), fmt.Sprintf("tap-ctl pause -p 1001 -m %d", m.minor))
	assert.Contains(t, s.mutations(), fmt.Sprintf("tap-ctl unpause -p 1001 -m %d", m.minor))
	m.sync()
	for i, snap := range snaps {
		s.checkDisk(fmt.Sprintf("snapshot %d, after the VM wrote on", i+1), snap, frozen[i])
	}
	s.checkDisk("the VM's disk", a, m.shadow)
	require.Len(t, s.chain(a), 4)

	for _, snap := range snaps {
		s.destroy(snap)
	}
	before := len(s.mutations())
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	m.requirePaused(false)
	assert.Len(t, s.chain(a), 1, "bases coalesced, then the leaf coalesced into the last one")
	assert.Len(t, s.images(), 1)
	gcCalls := s.mutations()[before:]
	assert.Contains(t, gcCalls, fmt.Sprintf("tap-ctl pause -p 1001 -m %d", m.minor), "the GC paused the VM to change its leaf")
	m.write(9)
	s.checkDisk("the VM's disk after the GC", a, m.shadow)
	assert.Empty(t, s.journals())

	// resize and clone of the running disk pause it too
	before = len(s.mutations())
	s.call("Volume.resize", nil, "key", a, "new_size", 2*volSize)
	m.requirePaused(false)
	assert.Contains(t, s.mutations()[before:], fmt.Sprintf("tap-ctl pause -p 1001 -m %d", m.minor))
	m.sync()
	assert.Equal(t, int64(2*volSize), m.img.VirtualSize(), "tapdisk reopened the grown image")
}

// A tapdisk that does not answer pause: Volume.snapshot fails with
// In_use and a sentence, nothing was renamed, and the VM writes on.
func TestSnapshotRefusedWhenTheTapdiskWillNotPause(t *testing.T) {
	s := newSR(t)
	a := s.create("A")
	m := s.start(a)
	m.write(0)
	images, leaf := s.images(), s.leaf(a)
	s.blktap.HangPause(1001, true)
	for _, method := range []string{"Volume.snapshot", "Volume.clone", "Volume.resize"} {
		p := map[string]any{"dbg": "t", "sr": s.dir, "key": a, "new_size": 2 * volSize}
		rec := s.ctx.ExpectError(method, p, "In_use")
		assert.Contains(t, rec.Params[1], "did not pause", method)
		assert.Contains(t, rec.Params[1], "nothing was changed and the VM keeps running", method)
		m.requirePaused(false)
		m.write(1)
		assert.Equal(t, images, s.images(), "%s renamed or created nothing", method)
		assert.Equal(t, leaf, s.leaf(a))
		assert.Empty(t, s.journals())
	}
	s.checkDisk("the VM's disk", a, m.shadow)

	// the GC skips a chain it cannot pause, and does it once it can
	s.blktap.HangPause(1001, false)
	snap := s.snapshot("Volume.snapshot", a)
	s.destroy(snap)
	s.blktap.HangPause(1001, true)
	m.write(2)
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	assert.Len(t, s.chain(a), 2, "skipped: the VM could not be paused")
	assert.Empty(t, s.journals())
	m.requirePaused(false)
	s.blktap.HangPause(1001, false)
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	assert.Len(t, s.chain(a), 1)
	m.write(3)
	s.checkDisk("the VM's disk after the GC", a, m.shadow)
}

// liveCrashEnv makes the test binary a volume call that SIGKILLs itself at
// a step, with the datapath model handed over in a file.
const liveCrashEnv = "VOLUMES_TEST_LIVE_CRASH"

type liveCrash struct {
	SR, State, DPDir, Method, Key, Step string
	Handles                             luksext.SRCheck // the parent's test mount root
}

func liveCrashHelper(spec string) int {
	var c liveCrash
	if err := json.Unmarshal([]byte(spec), &c); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 4
	}
	r := runfake.New()
	bt := tapdiskfake.New(r)
	data, err := os.ReadFile(c.State)
	if err == nil {
		err = bt.SetState(data)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 4
	}
	bt.AfterCommand = func() { _ = durable.WriteFile(c.State, bt.State(), 0o600) }
	// Step is "name" or "name-n": the n-th time that step is reached.
	target, nth := c.Step, 1
	if name, n, ok := strings.Cut(c.Step, "-"); ok {
		target, nth = name, int(n[0]-'0')
	}
	seen := 0
	fault := func(step string) {
		if step == target {
			if seen++; seen == nth {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		}
	}
	d := luksext.VolumeDeps{Images: image.Files{Runner: run.NewExec(quietLog())},
		Datapath: &attachment.Manager{Ctl: tapdisk.Ctl{Runner: r}, Dir: c.DPDir, Log: quietLog()},
		Fault:    fault, Handles: c.Handles}
	if c.Method == "gc" {
		err := luksext.CollectOnce(context.Background(), c.SR, d, fault, quietLog())
		fmt.Fprintln(os.Stderr, "not killed:", err)
		return 3
	}
	table := luksext.VolumeTable(luksext.Deps{Volumes: d})
	inv := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: quietLog()}}
	p, _ := json.Marshal(map[string]any{"dbg": "crash", "sr": c.SR, "key": c.Key})
	reply, err := inv.Invoke(context.Background(), c.Method, p)
	fmt.Fprintln(os.Stderr, "not killed:", err, string(reply.Stdout))
	return 3
}

// kill -9 at each step of a snapshot or clone of a running VM's disk:
// the next call (a Datapath call, a volume call, or the GC) finishes it
// and unpauses the VM; the VM's data and the snapshot's are whole.
func TestLiveSnapshotKilledAtEachStepConverges(t *testing.T) {
	vias := []string{"datapath", "volume", "gc"}
	i := 0
	for _, method := range []string{"Volume.snapshot", "Volume.clone"} {
		for _, step := range luksext.SnapshotSteps {
			via := vias[i%len(vias)]
			i++
			t.Run(method+"/"+step+"/"+via, func(t *testing.T) {
				s := newSR(t)
				a := s.create("A")
				m := s.start(a)
				m.write(0)
				atSnapshot := bytes.Clone(m.shadow)
				s.crash(m, method, a, step)
				if step != "journalled" && step != "unpaused" {
					m.requirePaused(true) // the crash left the VM paused
				}
				s.converge(via, a, m)
				m.requirePaused(false)
				m.write(1)
				if step == "journalled" && via == "datapath" {
					// nothing was paused, so the datapath had nothing to
					// finish: the snapshot is taken by the next volume call
					atSnapshot = bytes.Clone(m.shadow)
				}
				s.call("Volume.resize", nil, "key", a, "new_size", volSize) // finishes whatever is left
				m.requirePaused(false)
				assert.Empty(t, s.journals())
				m.write(2)
				s.checkDisk("the VM's disk", a, m.shadow)
				var vols []smapi.Volume
				s.call("SR.ls", &vols)
				for _, v := range vols {
					if v.Key != a {
						s.checkDisk("the "+method+" finished after the crash", v.Key, atSnapshot)
					}
				}
				if step != "journalled" && step != "paused" {
					assert.Len(t, vols, 2, "the %s was finished", method)
				}
			})
		}
	}
}

// crash runs method (or "gc") in a child process that SIGKILLs itself at
// step, with this SR's datapath model, and takes the model back.
func (s *sr) crash(m *vm, method, key, step string) {
	t := s.t
	t.Helper()
	stateFile := filepath.Join(t.TempDir(), "blktap.json")
	require.NoError(t, os.WriteFile(stateFile, s.blktap.LockedState(), 0o600))
	spec, _ := json.Marshal(liveCrash{SR: s.dir, State: stateFile, DPDir: s.dp.Dir, Method: method, Key: key, Step: step, Handles: s.handles})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), liveCrashEnv+"="+string(spec))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "%s", out)
	ws := ee.Sys().(syscall.WaitStatus)
	require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "killed at %s: %s", step, out)
	data, err := os.ReadFile(stateFile)
	require.NoError(t, err)
	require.NoError(t, s.blktap.SetState(data))
	m.sync()
}

// converge makes the call that must finish an interrupted operation.
func (s *sr) converge(via, key string, m *vm) {
	t := s.t
	t.Helper()
	switch via {
	case "datapath": // xapi-storage-script re-activating the VM's disk
		table := luksext.DatapathTable(luksext.Deps{Datapath: luksext.DatapathDeps{Runner: s.tapctl, StateDir: s.dp.Dir}, Volumes: s.deps()})
		x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "datapath", Table: table, Classify: luksext.Classify, Log: quietLog()}}
		dctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
		dctx.MustSucceed("Datapath.activate", map[string]any{"dbg": "t", "uri": luksext.VolumeURI(m.path), "domain": "5"}, nil)
	case "volume": // any call that changes the SR's tree
		s.call("Volume.resize", nil, "key", key, "new_size", volSize)
	case "gc":
		require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	}
}

// kill -9 at each step of the GC's coalesce and leaf-coalesce of a
// running VM's chain: the next Datapath call, volume call or GC run
// finishes it, the VM is not left paused, its data is whole and its chain
// ends one image deep.
func TestLiveGCKilledAtEachStepConverges(t *testing.T) {
	steps := []string{"journalled-1", "copied-1", "reparented-1", "deleted-1", "journalled-2", "copied-2", "renamed-1", "recorded-1"}
	vias := []string{"datapath", "volume", "gc"}
	for i, step := range steps {
		via := vias[i%len(vias)]
		t.Run(step+"/"+via, func(t *testing.T) {
			s := newSR(t)
			a := s.create("A")
			m := s.start(a)
			m.write(0)
			s1 := s.snapshot("Volume.snapshot", a)
			m.write(1)
			s2 := s.snapshot("Volume.snapshot", a)
			m.write(2)
			s.destroy(s1)
			s.destroy(s2)
			require.Len(t, s.chain(a), 3)
			s.crash(m, "gc", "", step)
			if strings.HasPrefix(step, "copied-2") || strings.HasPrefix(step, "renamed") || strings.HasPrefix(step, "recorded") {
				m.requirePaused(true) // killed inside the leaf-coalesce
			}
			s.converge(via, a, m)
			m.requirePaused(false)
			m.write(3)
			require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
			m.requirePaused(false)
			assert.Empty(t, s.journals())
			assert.Len(t, s.chain(a), 1)
			assert.Len(t, s.images(), 1)
			m.write(4)
			s.checkDisk("the VM's disk", a, m.shadow)
		})
	}
}

// Any number of snapshot + destroy cycles (a nightly backup's life),
// with the GC running only at the end: the chain is back to one image for
// a disk whose VM runs (small leaf: leaf-coalesced with the VM paused)
// and for one no VM uses, and at most two when the running VM's leaf is
// too large to coalesce while it is paused.
func TestSnapshotDeleteCyclesLeaveShortChains(t *testing.T) {
	for _, c := range []struct {
		name     string
		running  bool
		leafMax  int64
		maxChain int
	}{
		{"running VM", true, 0, 1},
		{"no VM", false, 0, 1},
		{"running VM, leaf too large to coalesce live", true, 4096, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newSR(t)
			a := s.create("A")
			var m *vm
			write := func(round int) { s.write(a, int64(round%8)*mib+512*int64(round), 512) }
			if c.running {
				m = s.start(a)
				write = m.write
			}
			for i := 0; i < 6; i++ {
				write(i)
				snap := s.snapshot("Volume.snapshot", a)
				write(100 + i)
				s.destroy(snap)
			}
			require.Len(t, s.chain(a), 7)
			if c.leafMax > 0 {
				t.Setenv(luksext.GCLiveLeafMaxEnv, fmt.Sprint(c.leafMax)) // product knob
			}
			require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
			assert.Len(t, s.chain(a), c.maxChain)
			assert.Len(t, s.images(), c.maxChain)
			if m != nil {
				m.requirePaused(false)
				m.write(200)
				s.checkDisk("the VM's disk", a, m.shadow)
			} else {
				s.checkDisk("the disk", a, s.model[a])
			}
		})
	}
}

// The same for a qcow2 volume (> 2040 GiB, sparse): snapshot + destroy
// cycles, then the GC (qemu-img commit, then the leaf-coalesce) leaves one
// image, and qemu-io reads back every sector written, partial clusters
// included.
func TestQCOW2SnapshotDeleteCyclesLeaveOneImage(t *testing.T) {
	tools := testenv.Tools(t, "qemu-img", "qemu-io")
	s := newSR(t)
	var v smapi.Volume
	s.call("Volume.create", &v, "name", "big", "description", "", "size", int64(2100)<<30, "sharable", false)
	a := v.Key
	require.Equal(t, ".qcow2", filepath.Ext(s.leaf(a)))
	qio := func(cmd string) {
		t.Helper()
		out, err := exec.Command(tools["qemu-io"], "-f", "qcow2", "-c", cmd, s.leaf(a)).CombinedOutput()
		require.NoError(t, err, "qemu-io %s: %s", cmd, out)
		require.NotContains(t, string(out), "Pattern verification failed", cmd)
	}
	for i := 0; i < 5; i++ {
		qio(fmt.Sprintf("write -P %d %d 512", 0x10+i, int64(i)*(1<<30)+512*int64(i)))
		var snap smapi.Volume
		s.call("Volume.snapshot", &snap, "key", a)
		qio(fmt.Sprintf("write -P %d %d 512", 0x40+i, int64(i)*(1<<30)+4096))
		s.destroy(snap.Key)
	}
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	m, _ := filepath.Glob(filepath.Join(s.dir, "*.qcow2"))
	assert.Equal(t, []string{s.leaf(a)}, m, "one image left")
	out, err := exec.Command(tools["qemu-img"], "info", "--output=json", s.leaf(a)).Output()
	require.NoError(t, err)
	assert.NotContains(t, string(out), "backing-filename", "no backing file left")
	for i := 0; i < 5; i++ {
		qio(fmt.Sprintf("read -P %d %d 512", 0x10+i, int64(i)*(1<<30)+512*int64(i)))
		qio(fmt.Sprintf("read -P %d %d 512", 0x40+i, int64(i)*(1<<30)+4096))
		qio(fmt.Sprintf("read -P 0 %d 512", int64(i)*(1<<30)+8192))
	}
}

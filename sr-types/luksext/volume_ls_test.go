package luksext_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/gc"
	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/luksexttest"
)

// lsFixture: an SR, the volume table, and a datapath whose tapdisks are
// tapdiskfake's, wired as the plugins wire them (Closed: ImageClosed).
type lsFixture struct {
	t   *testing.T
	sr  string
	inv smapitest.InProcess
	ctx *smapitest.Ctx
	dp  *attachment.Manager
}

func newLsFixture(t *testing.T) *lsFixture {
	r := luksexttest.NewRoot(t)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	fake := runfake.New()
	tapdiskfake.New(fake)
	dp := &attachment.Manager{Ctl: tapdisk.Ctl{Runner: fake}, Dir: filepath.Join(t.TempDir(), "datapath"), Log: log, Closed: luksext.ImageClosed}
	table := luksext.VolumeTable(luksext.Deps{Paths: run.DefaultPaths, Volumes: luksext.VolumeDeps{
		Images: image.Files{Runner: run.NewExec(log)}, Handles: r.Check, Datapath: dp, InUse: dp.InUseUnder}})
	inv := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: log}}
	return &lsFixture{t: t, sr: testSR(t, r), inv: inv, dp: dp, ctx: &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: inv, Table: table}}}
}

func (f *lsFixture) create(name string) string {
	var v smapi.Volume
	f.ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": f.sr, "name": name, "description": "<&>", "size": 8 << 20, "sharable": false}, &v)
	return v.Key
}

// ls returns SR.ls's allocations by key, after checking that the reply
// is byte for byte what encoding/json makes of it.
func (f *lsFixture) ls() map[string]int64 {
	f.t.Helper()
	r, err := smapitest.Call(context.Background(), f.inv, "SR.ls", map[string]any{"dbg": "t", "sr": f.sr})
	require.NoError(f.t, err)
	require.Zero(f.t, r.ExitCode, "%s", r.Stdout)
	var vs []smapi.Volume
	require.NoError(f.t, json.Unmarshal(r.Stdout, &vs))
	want, _ := json.Marshal(vs)
	require.Equal(f.t, string(want)+"\n", string(r.Stdout), "SR.ls replies what encoding/json writes")
	out := map[string]int64{}
	for _, v := range vs {
		out[v.Key] = v.PhysicalUtilisation
	}
	return out
}

func (f *lsFixture) leaf(key string) string { return filepath.Join(f.sr, key+".vhd") }

func (f *lsFixture) stat(key string) int64 {
	var st syscall.Stat_t
	require.NoError(f.t, syscall.Stat(f.leaf(key), &st))
	return st.Blocks * 512
}

// exact: SR.ls says what a stat of every leaf says.
func (f *lsFixture) exact(what string) {
	f.t.Helper()
	got := f.ls()
	for k, phys := range got {
		require.Equal(f.t, f.stat(k), phys, "%s: physical_utilisation of %s", what, k)
	}
}

// grow allocates 1 MiB more at the end of the leaf, as a writer the SR
// type is not told about would.
func (f *lsFixture) grow(key string) {
	f.t.Helper()
	fh, err := os.OpenFile(f.leaf(key), os.O_RDWR, 0)
	require.NoError(f.t, err)
	st, _ := fh.Stat()
	buf := make([]byte, 1<<20)
	buf[0] = 1
	_, err = fh.WriteAt(buf, st.Size())
	require.NoError(f.t, err)
	require.NoError(f.t, fh.Sync())
	require.NoError(f.t, fh.Close())
}

func TestSRLsCachedAllocationsAndTheirInvalidation(t *testing.T) {
	f := newLsFixture(t)
	a, b := f.create("a"), f.create("b")
	f.exact("first call (renders the records, stats every leaf)")
	before := f.stat(a)

	// The cache is really used: a change no writer announces is not seen
	// (this is the contract: every writer of a leaf is a tapdisk with a
	// datapath record, or bumps a tag first).
	f.grow(a)
	require.Equal(t, before, f.ls()[a], "served from the cache")
	require.NoError(t, store.New(f.sr).InvalidateAllocation())
	f.exact("after InvalidateAllocation (every leaf stat'ed again)")

	// attach: the leaf has a datapath record, so it is stat'ed at every
	// call while tapdisk may write it
	img := tapdisk.Image{Type: "vhd", Path: f.leaf(a)}
	ctx := context.Background()
	_, err := f.dp.Attach(ctx, img, "3")
	require.NoError(t, err)
	require.NoError(t, f.dp.Activate(ctx, img, "3", false))
	f.grow(a)
	f.exact("attached, grown")
	f.grow(a)
	f.exact("attached, grown again")
	require.NoError(t, f.dp.Detach(ctx, img, "3"))
	f.exact("detached: the teardown invalidated the cached allocations")

	// a damaged cache is rebuilt from stats
	cache := store.New(f.sr).VolumesCachePath()
	raw, err := os.ReadFile(cache)
	require.NoError(t, err)
	raw[len(raw)/2] ^= 0x40
	require.NoError(t, os.WriteFile(cache, raw, 0o600))
	f.grow(b)
	f.exact("damaged cache")
	require.NoError(t, os.WriteFile(cache, []byte("LXVOLS1\n"), 0o600))
	f.grow(b)
	f.exact("truncated cache")

	// volume calls that change a leaf
	f.ctx.MustSucceed("Volume.resize", map[string]any{"dbg": "t", "sr": f.sr, "key": a, "new_size": 16 << 20}, nil)
	f.exact("after resize")
	var s smapi.Volume
	f.ctx.MustSucceed("Volume.snapshot", map[string]any{"dbg": "t", "sr": f.sr, "key": a}, &s)
	f.exact("after snapshot (the leaf is a new, empty image)")
	f.ctx.MustSucceed("Volume.destroy", map[string]any{"dbg": "t", "sr": f.sr, "key": s.Key}, nil)
	require.NoError(t, luksext.CollectOnce(ctx, f.sr, luksext.VolumeDeps{Images: image.Files{}, Datapath: f.dp}, nil, logrus.New()))
	f.exact("after the GC coalesced the leaf into its parent")
	f.ctx.MustSucceed("Volume.set_name", map[string]any{"dbg": "t", "sr": f.sr, "key": b, "new_name": "b2"}, nil)
	f.exact("after set_name")
}

// A volume call that changes a VDI's leaf in place invalidates the cached
// allocations (before it does: killed right after the change, before its
// records, SR.ls must not serve the old allocation). Snapshot, clone and
// leaf-coalesce do too, but they also rename files in the SR root, whose
// stat is part of the tag.
func TestLeafChangesInvalidateBeforeTheyHappen(t *testing.T) {
	f := newLsFixture(t)
	a := f.create("a")
	f.exact("first")
	st := store.New(f.sr)
	tag, ok := st.AllocTag()
	require.True(t, ok)
	f.ctx.MustSucceed("Volume.resize", map[string]any{"dbg": "t", "sr": f.sr, "key": a, "new_size": 16 << 20}, nil)
	now, _ := st.AllocTag()
	require.NotEqual(t, tag, now, "resize")

	// The GC re-parents VDI leaves in place: A and S2 sit on base2, the
	// only child of base1 once S1 is gone; base2 is coalesced into base1,
	// then A and S2 are re-parented onto base1.
	var s1, s2 smapi.Volume
	f.ctx.MustSucceed("Volume.snapshot", map[string]any{"dbg": "t", "sr": f.sr, "key": a}, &s1)
	f.ctx.MustSucceed("Volume.snapshot", map[string]any{"dbg": "t", "sr": f.sr, "key": a}, &s2)
	f.ctx.MustSucceed("Volume.destroy", map[string]any{"dbg": "t", "sr": f.sr, "key": s1.Key}, nil)
	var copied, reparented string
	fault := func(step string) {
		switch step {
		case gc.StepCopied:
			copied, _ = st.AllocTag()
		case gc.StepReparented:
			reparented, _ = st.AllocTag()
		}
	}
	require.NoError(t, luksext.CollectOnce(context.Background(), f.sr, luksext.VolumeDeps{Datapath: f.dp}, fault, logrus.New()))
	require.NotEmpty(t, copied, "the GC coalesced a hidden node")
	require.NotEqual(t, copied, reparented, "re-parenting the leaves")
	f.exact("after the GC")
}

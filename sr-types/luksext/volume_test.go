package luksext_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/luksexttest"
)

// testSR makes a directory that passes the SR handle check (luksexttest):
// the SR record at its root, as SR.create writes it, listed as mounted from
// /dev/mapper/luksext-<uuid> in r's mount table.
func testSR(t testing.TB, r *luksexttest.Root) string {
	return r.NewSR(t).Path
}

func volumeTable(r *luksexttest.Root) smapi.Table {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	return luksext.VolumeTable(luksext.Deps{Paths: run.DefaultPaths,
		Volumes: luksext.VolumeDeps{Images: image.Files{Runner: run.NewExec(log)}, Handles: r.Check}})
}

func TestVolumeConformanceInProcess(t *testing.T) {
	r := luksexttest.NewRoot(t)
	table := volumeTable(r)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	srs := map[string]string{}
	sr := func(c *smapitest.Ctx) string {
		// one SR per case: fresh state per test
		name := c.T.(*testing.T).Name()
		if srs[name] == "" {
			srs[name] = testSR(c.T.(*testing.T), r)
		}
		return srs[name]
	}
	smapitest.Run(t, smapitest.Config{
		Invoker:   smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: log}},
		Table:     table,
		Plugin:    luksext.PluginName,
		Lifecycle: smapitest.VolumeCases(sr, 8<<20),
	})
}

func TestSRLsFailsWhenSRIsNotThere(t *testing.T) {
	r := luksexttest.NewRoot(t)
	table := volumeTable(r)
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	ctx.ExpectError("SR.ls", map[string]any{"dbg": "t", "sr": filepath.Join(t.TempDir(), "gone")}, "Sr_not_attached")

	sr := testSR(t, r)
	var v smapi.Volume
	ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "a", "description": "", "size": 1 << 20, "sharable": false}, &v)
	require.NoError(t, os.WriteFile(filepath.Join(sr, store.MetaDir, "nodes", v.Key+".json"), []byte("{garbage"), 0o600))
	ctx.ExpectError("SR.ls", map[string]any{"dbg": "t", "sr": sr}, "Needs_attention")
}

func TestVolumeDestroyRefusesAttachedVolume(t *testing.T) {
	var attached []string
	r := luksexttest.NewRoot(t)
	table := luksext.VolumeTable(luksext.Deps{Volumes: luksext.VolumeDeps{
		InUse:   func(string) ([]string, error) { return attached, nil },
		Handles: r.Check,
	}})
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	sr := testSR(t, r)
	var v smapi.Volume
	ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "a", "description": "", "size": 1 << 20, "sharable": false}, &v)
	attached = []string{v.Key + ".vhd"}
	ctx.ExpectError("Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, "In_use")
	ctx.MustSucceed("Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, nil)
	attached = nil
	ctx.MustSucceed("Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, nil)
}

// Volume.snapshot and Volume.clone copy the name and description only
// (SMAPIv3 IDL): keys set with Volume.set, clone-on-boot above all, stay
// with the source; a snapshot is read-only, a clone read-write.
func TestSnapshotAndCloneCopyOnlyNameAndDescription(t *testing.T) {
	r := luksexttest.NewRoot(t)
	table := volumeTable(r)
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	sr := testSR(t, r)
	var v smapi.Volume
	ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "disk", "description": "the VM's disk", "size": 1 << 20, "sharable": false}, &v)
	set := map[string]string{"clone-on-boot": store.NewID(), "vdi-type": "user", "tags": "[nightly]", "_sm_config_foo": "bar"}
	for k, val := range set {
		ctx.MustSucceed("Volume.set", map[string]any{"dbg": "t", "sr": sr, "key": v.Key, "k": k, "v": val}, nil)
	}
	for _, method := range []string{"Volume.snapshot", "Volume.clone"} {
		var n smapi.Volume
		ctx.MustSucceed(method, map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, &n)
		require.NotEqual(t, v.Key, n.Key)
		require.Equal(t, "disk", n.Name, method)
		require.Equal(t, "the VM's disk", n.Description, method)
		require.Empty(t, n.Keys, "%s copied keys set with Volume.set", method)
		require.Equal(t, method == "Volume.clone", n.ReadWrite, method)
		var again smapi.Volume
		ctx.MustSucceed("Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": n.Key}, &again)
		require.Empty(t, again.Keys, "%s: stored record", method)
	}
	var src smapi.Volume
	ctx.MustSucceed("Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, &src)
	require.Equal(t, set, src.Keys, "the source keeps its keys")
}

// A snapshot record written before that rule (keys copied) still reads,
// snapshots and destroys.
func TestOldSnapshotRecordWithCopiedKeysKeepsWorking(t *testing.T) {
	r := luksexttest.NewRoot(t)
	table := volumeTable(r)
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	sr := testSR(t, r)
	var v, s smapi.Volume
	ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "disk", "description": "", "size": 1 << 20, "sharable": false}, &v)
	ctx.MustSucceed("Volume.snapshot", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, &s)
	st := store.New(sr)
	n, err := st.Get(s.Key)
	require.NoError(t, err)
	n.VDI.Keys = map[string]string{"clone-on-boot": v.Key, "vdi-type": "user"} // as the old code copied them
	require.NoError(t, st.Put(n))
	var got smapi.Volume
	ctx.MustSucceed("Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": s.Key}, &got)
	require.Equal(t, "user", got.Keys["vdi-type"])
	var c smapi.Volume
	ctx.MustSucceed("Volume.clone", map[string]any{"dbg": "t", "sr": sr, "key": s.Key}, &c)
	require.Empty(t, c.Keys)
	ctx.MustSucceed("Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": s.Key}, nil)
	ctx.MustSucceed("Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": c.Key}, nil)
}

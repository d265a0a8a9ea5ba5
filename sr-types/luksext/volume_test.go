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

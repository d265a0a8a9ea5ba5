package luksext_test

import (
	"encoding/json"
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
)

// testSR makes a directory that looks like an attached luksext SR: the SR
// record at its root, as SR.create writes it.
func testSR(t testing.TB) string {
	dir := t.TempDir()
	b, err := json.Marshal(map[string]any{"schema": 1, "uuid": store.NewID(), "name": "test SR", "description": ""})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, luksext.SRMetaFile), b, 0o600))
	return dir
}

func volumeTable() smapi.Table {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	return luksext.VolumeTable(luksext.Deps{Paths: run.DefaultPaths,
		Volumes: luksext.VolumeDeps{Images: image.Files{Runner: run.NewExec(log)}}})
}

func TestVolumeConformanceInProcess(t *testing.T) {
	table := volumeTable()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	srs := map[string]string{}
	sr := func(c *smapitest.Ctx) string {
		// one SR per case: fresh state per test
		name := c.T.(*testing.T).Name()
		if srs[name] == "" {
			srs[name] = testSR(c.T.(*testing.T))
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
	table := volumeTable()
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	ctx.ExpectError("SR.ls", map[string]any{"dbg": "t", "sr": filepath.Join(t.TempDir(), "gone")}, "Sr_not_attached")

	sr := testSR(t)
	var v smapi.Volume
	ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "a", "description": "", "size": 1 << 20, "sharable": false}, &v)
	require.NoError(t, os.WriteFile(filepath.Join(sr, store.MetaDir, "nodes", v.Key+".json"), []byte("{garbage"), 0o600))
	ctx.ExpectError("SR.ls", map[string]any{"dbg": "t", "sr": sr}, "Needs_attention")
}

func TestVolumeDestroyRefusesAttachedVolume(t *testing.T) {
	var attached []string
	table := luksext.VolumeTable(luksext.Deps{Volumes: luksext.VolumeDeps{
		InUse: func(string) ([]string, error) { return attached, nil },
	}})
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	sr := testSR(t)
	var v smapi.Volume
	ctx.MustSucceed("Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "a", "description": "", "size": 1 << 20, "sharable": false}, &v)
	attached = []string{v.Key + ".vhd"}
	ctx.ExpectError("Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, "In_use")
	ctx.MustSucceed("Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, nil)
	attached = nil
	ctx.MustSucceed("Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, nil)
}

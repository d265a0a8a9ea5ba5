package luksext_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/luksexttest"
)

// TestVolumeCreateRefusesQCOW2WithoutTapdiskDriver: a volume above 2040
// GiB (qcow2) on a host whose tapdisk has no qcow2 disk type is refused
// with a readable Invalid_parameters before anything is written; VHD
// volumes are unaffected, and a host without tapdisk at all is not
// refused.
func TestVolumeCreateRefusesQCOW2WithoutTapdiskDriver(t *testing.T) {
	dir := t.TempDir()
	upstream := filepath.Join(dir, "tapdisk")
	// What upstream 3.55.5's table holds: "qcow", no "qcow2".
	require.NoError(t, os.WriteFile(upstream, []byte("\x7fELF\x00aio\x00raw image (aio)\x00vhd\x00qcow\x00qcow disk (qcow)\x00"), 0o755))
	paths := []string{upstream}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	r := luksexttest.NewRoot(t)
	table := luksext.VolumeTable(luksext.Deps{Paths: run.DefaultPaths, Volumes: luksext.VolumeDeps{
		Images:  image.Files{Runner: run.NewExec(log)},
		Handles: r.Check,
		QCOW2:   func() error { return tapdisk.SupportsDiskType(paths, "qcow2") },
	}})
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	ctx := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	sr := testSR(t, r)
	params := func(size int64) map[string]any {
		return map[string]any{"dbg": "t", "sr": sr, "name": "big", "description": "", "size": size, "sharable": false}
	}
	rec := ctx.ExpectError("Volume.create", params(3<<40), "Invalid_parameters")
	require.NotNil(t, rec)
	assert.Contains(t, rec.Params[1], "qcow2")
	assert.Contains(t, rec.Params[1], upstream)
	assert.Contains(t, rec.Params[1], "2040 GiB")
	var vols []smapi.Volume
	ctx.MustSucceed("SR.ls", map[string]any{"dbg": "t", "sr": sr}, &vols)
	assert.Empty(t, vols, "nothing was created")
	entries, _ := os.ReadDir(sr)
	for _, e := range entries {
		assert.NotRegexp(t, `\.qcow2$`, e.Name())
	}
	ctx.MustSucceed("Volume.create", params(8<<20), nil)

	paths = []string{filepath.Join(dir, "absent")}
	testenv.Tools(t, "qemu-img")
	ctx.MustSucceed("Volume.create", params(3<<40), nil)
}

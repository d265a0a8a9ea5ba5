package luksext

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
)

func TestParseVolumeURI(t *testing.T) {
	img, err := ParseVolumeURI("luksext:///var/run/sr-mount/5e1f/0c7b.vhd")
	require.NoError(t, err)
	assert.Equal(t, tapdisk.Image{Type: "vhd", Path: "/var/run/sr-mount/5e1f/0c7b.vhd"}, img)
	img, err = ParseVolumeURI(VolumeURI("/var/run/sr-mount/5e1f/big.qcow2"))
	require.NoError(t, err)
	assert.Equal(t, tapdisk.Image{Type: "qcow2", Path: "/var/run/sr-mount/5e1f/big.qcow2"}, img)

	for _, bad := range []string{
		"tapdisk:///var/run/sr-mount/5e1f/0c7b.vhd", // another datapath's scheme
		"luksext://host/var/x.vhd",                  // a host part
		"luksext://relative.vhd",
		"luksext:///var/run/sr-mount/5e1f/../../etc/x.vhd",
		"luksext:///var/run/sr-mount/5e1f/0c7b.img",
		"luksext:///var/run/sr-mount/5e1f/0c7b.vhd?size=1",
		"luksext:///var/run/sr-mount/5e1f/",
		"",
		"%zz",
	} {
		_, err := ParseVolumeURI(bad)
		assert.ErrorIs(t, err, ErrBadURI, bad)
	}
}

type dpFixture struct {
	deps  Deps
	table smapi.Table
	bt    *tapdiskfake.Blktap
	dir   string
	n     atomic.Int32
}

func newDPFixture(t *testing.T) *dpFixture {
	f := runfake.New()
	dir := t.TempDir()
	fx := &dpFixture{bt: tapdiskfake.New(f), dir: dir}
	fx.deps = Deps{Paths: run.DefaultPaths, Datapath: DatapathDeps{Runner: f, StateDir: filepath.Join(dir, "state")}}
	fx.table = DatapathTable(fx.deps)
	return fx
}

func (fx *dpFixture) plugin() smapi.Plugin {
	log := logrus.New()
	log.SetOutput(io.Discard)
	return smapi.Plugin{Kind: "datapath", Table: fx.table, Classify: Classify, Log: log}
}

// newVolume makes an (empty) image file; the in-memory blktap never reads it.
func (fx *dpFixture) newVolume(t testing.TB) string {
	p := filepath.Join(fx.dir, fmt.Sprintf("vol%d.vhd", fx.n.Add(1)))
	require.NoError(t, os.WriteFile(p, nil, 0o600))
	return VolumeURI(p)
}

func TestDatapathConformanceInProcess(t *testing.T) {
	fx := newDPFixture(t)
	smapitest.Run(t, smapitest.Config{
		Invoker: smapitest.InProcess{Plugin: fx.plugin()},
		Table:   fx.table, Plugin: PluginName,
		Lifecycle: smapitest.DatapathCases(smapitest.DatapathVolumes{
			NewURI: func(*smapitest.Ctx) string { return fx.newVolume(t) },
			CheckBackend: func(c *smapitest.Ctx, b smapi.Backend) {
				require.Len(c.T.(*testing.T), b.Implementations, 2)
				x, d := b.Implementations[0].XenDisk, b.Implementations[1].BlockDevice
				require.NotNil(c.T.(*testing.T), x)
				require.NotNil(c.T.(*testing.T), d)
				assert.Equal(c.T.(*testing.T), "vbd3", x.BackendType)
				assert.Equal(c.T.(*testing.T), d.Path, x.Params)
				assert.Regexp(c.T.(*testing.T), `^/dev/xen/blktap-2/tapdev\d+$`, d.Path)
				assert.Equal(c.T.(*testing.T), map[string]string{}, x.Extra)
			},
		}),
	})
	assert.Empty(t, fx.bt.Tapdisks(), "every case cleaned up after itself")
	assert.Empty(t, fx.bt.Minors())
}

func call(t *testing.T, p smapi.Plugin, method string, params any) (int, string) {
	b, err := json.Marshal(params)
	require.NoError(t, err)
	var out bytes.Buffer
	code := smapi.Main(context.Background(), p, smapi.Invocation{Args: []string{"/x/" + method, "--json"}, Stdin: bytes.NewReader(b), Stdout: &out})
	return code, out.String()
}

func TestDatapathErrorRecords(t *testing.T) {
	fx := newDPFixture(t)
	p := fx.plugin()
	uri := fx.newVolume(t)

	code, out := call(t, p, "Datapath.attach", map[string]string{"dbg": "d", "uri": strings.Replace(uri, "/vol", "/./vol", 1), "domain": "7"})
	assert.Equal(t, 1, code)
	assert.Contains(t, out, `"Invalid_parameters"`, "a path that is not clean")

	code, out = call(t, p, "Datapath.attach", map[string]string{"dbg": "d", "uri": strings.TrimSuffix(uri, ".vhd") + "x.vhd", "domain": "7"})
	assert.Equal(t, 1, code)
	assert.Contains(t, out, `"Volume_does_not_exist"`)

	code, out = call(t, p, "Datapath.activate", map[string]string{"dbg": "d", "uri": uri, "domain": "7"})
	assert.Equal(t, 1, code)
	assert.Contains(t, out, `"Invalid_parameters"`)
	assert.Contains(t, out, "Datapath.attach first")

	for _, d := range []string{"7", "8"} {
		code, out = call(t, p, "Datapath.attach", map[string]string{"dbg": "d", "uri": uri, "domain": d})
		require.Equal(t, 0, code, out)
	}
	code, out = call(t, p, "Datapath.activate_readonly", map[string]string{"dbg": "d", "uri": uri, "domain": "7"})
	require.Equal(t, 0, code, out)
	assert.True(t, fx.bt.Minors()[0].ReadOnly)
	code, out = call(t, p, "Datapath.activate", map[string]string{"dbg": "d", "uri": uri, "domain": "8"})
	assert.Equal(t, 1, code)
	assert.Contains(t, out, `"In_use"`)

	// No tap-ctl at all: the record names the tool.
	missing := Deps{Paths: run.DefaultPaths, Datapath: DatapathDeps{Runner: runfake.New(), StateDir: filepath.Join(t.TempDir(), "s")}}
	p.Table = DatapathTable(missing)
	code, out = call(t, p, "Datapath.attach", map[string]string{"dbg": "d", "uri": uri, "domain": "7"})
	assert.Equal(t, 1, code)
	assert.Contains(t, out, `"Tool_missing"`)
	assert.Contains(t, out, "tap-ctl")
}

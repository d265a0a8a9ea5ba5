package datapath

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/sr-types/luksext"
)

var (
	buildOnce sync.Once
	built     Binaries
	buildDir  string
)

// builtOnce builds the binaries once per test run (two cores: builds are
// the slow part of these tests).
func builtOnce(t *testing.T) Binaries {
	buildOnce.Do(func() {
		var err error
		buildDir, err = os.MkdirTemp("", "luksext-datapath-test")
		require.NoError(t, err)
		built = Build(t, buildDir)
	})
	require.NotEmpty(t, built.TapCtl, "the build failed in an earlier test")
	return built
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// envRunner adds the fake's configuration to each command: run.Exec
// gives children a minimal environment on purpose.
type envRunner struct {
	inner run.Runner
	env   []string
}

func (r envRunner) Run(ctx context.Context, c run.Cmd) (run.Result, error) {
	c.Env = append(append([]string(nil), c.Env...), r.env...)
	return r.inner.Run(ctx, c)
}

type hostSetup struct {
	plugin   smapi.Plugin
	fakeDir  string
	devDir   string
	imageDir string
}

// newHost wires the in-process datapath plugin to the real fake tap-ctl
// binary (backend "none": tapdevN links to the image file), and kills any
// fake tapdisk left at the end.
func newHost(t *testing.T) *hostSetup {
	dir := t.TempDir()
	b := builtOnce(t)
	h := &hostSetup{fakeDir: filepath.Join(dir, "fake"), devDir: filepath.Join(dir, "dev"), imageDir: filepath.Join(dir, "sr")}
	require.NoError(t, os.MkdirAll(h.imageDir, 0o755))
	log := logrus.New()
	log.SetOutput(io.Discard)
	r := envRunner{inner: &run.Exec{Paths: run.Paths{"tap-ctl": b.TapCtl}, Log: log},
		env: []string{"TAPCTL_FAKE_STATE=" + h.fakeDir, "TAPCTL_FAKE_BACKEND=none", "TAPCTL_FAKE_DEVDIR=" + h.devDir}}
	table := luksext.DatapathTable(luksext.Deps{Paths: run.DefaultPaths,
		Datapath: luksext.DatapathDeps{Runner: r, StateDir: filepath.Join(dir, "state")}})
	h.plugin = smapi.Plugin{Kind: "datapath", Table: table, Classify: luksext.Classify, Log: log}
	t.Cleanup(func() {
		for _, p := range h.tapdisks(t) {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	})
	return h
}

// tapdisks are the fake tapdisk processes still alive.
func (h *hostSetup) tapdisks(t *testing.T) []int {
	b, err := os.ReadFile(filepath.Join(h.fakeDir, "state.json"))
	if err != nil {
		return nil
	}
	var st struct{ Tapdisks []int }
	require.NoError(t, json.Unmarshal(b, &st))
	var live []int
	for _, p := range st.Tapdisks {
		if c, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p)); err == nil && strings.Contains(string(c), "__tapdisk") {
			live = append(live, p)
		}
	}
	return live
}

func (h *hostSetup) newVolume(t testing.TB, ext string) string {
	f, err := os.CreateTemp(h.imageDir, "vol*"+ext)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(1<<20))
	require.NoError(t, f.Close())
	return luksext.VolumeURI(f.Name())
}

func TestConformanceWithFakeTapCtl(t *testing.T) {
	h := newHost(t)
	smapitest.Run(t, smapitest.Config{
		Invoker: smapitest.InProcess{Plugin: h.plugin}, Table: h.plugin.Table, Plugin: luksext.PluginName,
		Lifecycle: smapitest.DatapathCases(smapitest.DatapathVolumes{NewURI: func(*smapitest.Ctx) string { return h.newVolume(t, ".vhd") }}),
	})
	assert.Empty(t, h.tapdisks(t), "every case tore its tapdisk down")
}

func TestServesTheImageAndDetachesFromPipes(t *testing.T) {
	h := newHost(t)
	ctx := context.Background()
	uri := h.newVolume(t, ".qcow2")
	p := map[string]any{"dbg": "t", "uri": uri, "domain": "7"}
	t0 := time.Now()
	r, err := smapitest.Call(ctx, smapitest.InProcess{Plugin: h.plugin}, "Datapath.attach", p)
	require.NoError(t, err)
	require.Equal(t, 0, r.ExitCode, "%s", r.Stdout)
	// A tapdisk holding run.Exec's pipes would make spawn wait for
	// run.Exec's WaitDelay (5 s) and fail.
	assert.Less(t, time.Since(t0), 4*time.Second)
	var b smapi.Backend
	require.NoError(t, json.Unmarshal(r.Stdout, &b))
	dev := b.Implementations[1].BlockDevice.Path
	assert.Equal(t, filepath.Join(h.devDir, "tapdev0"), dev)

	live := h.tapdisks(t)
	require.Len(t, live, 1)
	for _, fd := range []string{"0", "1", "2"} {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", live[0], fd))
		require.NoError(t, err)
		assert.Equal(t, "/dev/null", target, "tapdisk fd %s", fd)
	}

	r, err = smapitest.Call(ctx, smapitest.InProcess{Plugin: h.plugin}, "Datapath.activate", p)
	require.NoError(t, err)
	require.Equal(t, 0, r.ExitCode, "%s", r.Stdout)
	require.NoError(t, os.WriteFile(dev, []byte("through the tapdev"), 0o600))
	for _, m := range []string{"Datapath.deactivate", "Datapath.detach"} {
		r, err = smapitest.Call(ctx, smapitest.InProcess{Plugin: h.plugin}, m, p)
		require.NoError(t, err)
		require.Equal(t, 0, r.ExitCode, "%s: %s", m, r.Stdout)
	}
	got, err := os.ReadFile(strings.TrimPrefix(uri, "luksext://"))
	require.NoError(t, err)
	assert.Equal(t, "through the tapdev", string(got))
	assert.Empty(t, h.tapdisks(t), "the tapdisk exited with its last device")
	_, err = os.Lstat(dev)
	assert.True(t, os.IsNotExist(err), "tapdev freed")
}

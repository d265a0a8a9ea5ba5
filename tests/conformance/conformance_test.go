// Package conformance runs the SMAPIv3 conformance suite against the luksext
// plugins: in-process (every `make test`, no root) and against the
// executables installed by `make install DESTDIR=...`, called exactly as
// xapi-storage-script calls them.
package conformance

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/sr-types/luksext"
)

// deps are the real ones: the placeholder calls of the suite name nothing
// that exists, so they reach no disk, TPM or xapi.
func deps() luksext.Deps {
	return luksext.RealDeps(logging.New(logging.Options{Plugin: "test", Stderr: os.Stderr, Level: "warn"}))
}

func TestInProcessVolume(t *testing.T) {
	table := luksext.VolumeTable(deps())
	log := logging.New(logging.Options{Plugin: "volume", Stderr: os.Stderr, Level: "warn"})
	smapitest.Run(t, smapitest.Config{
		Invoker: smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: log}},
		Table:   table, Plugin: luksext.PluginName,
	})
}

func TestInProcessDatapath(t *testing.T) {
	table := luksext.DatapathTable(deps())
	log := logging.New(logging.Options{Plugin: "datapath", Stderr: os.Stderr, Level: "warn"})
	smapitest.Run(t, smapitest.Config{
		Invoker: smapitest.InProcess{Plugin: smapi.Plugin{Kind: "datapath", Table: table, Classify: luksext.Classify, Log: log}},
		Table:   table, Plugin: luksext.PluginName,
	})
}

// repoRoot is two levels up from this file.
func repoRoot(t *testing.T) string {
	_, file, _, ok := runtime.Caller(0)
	require.True(t, ok)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// InstallTree runs `make install DESTDIR=<tmp>` and returns the tmp root.
// The build goes to a private directory so parallel test packages do not
// race on build/bin.
func InstallTree(t *testing.T) string {
	t.Helper()
	dest := t.TempDir()
	bin := t.TempDir()
	cmd := exec.Command("make", "-C", repoRoot(t), "install", "DESTDIR="+dest, "BIN="+bin)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "make install: %s", out)
	return dest
}

func TestExecInstalledTree(t *testing.T) {
	dest := InstallTree(t)
	root := filepath.Join(dest, "usr/libexec/xapi-storage-script")
	for _, tc := range []struct {
		name  string
		dir   string
		table smapi.Table
	}{
		{"volume", filepath.Join(root, "volume", luksext.VolumePluginDir), luksext.VolumeTable(deps())},
		{"datapath", filepath.Join(root, "datapath", luksext.DatapathPluginDir), luksext.DatapathTable(deps())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := &smapitest.Exec{Dir: tc.dir, Env: []string{"LUKSEXT_LOG_LEVEL=warn"}}
			smapitest.Run(t, smapitest.Config{Invoker: x, Exec: x, Table: tc.table, Plugin: luksext.PluginName})
		})
	}
}

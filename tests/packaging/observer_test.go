package packaging

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
)

// standInObserver does what xen-api's python3/packages/observer.py main()
// does with the script it wraps, minus the tracing: shift sys.argv so the
// script is argv[0], runpy.run_path(file, run_name="__main__"), exit 2 on
// FileNotFoundError and 139 on any other Exception, printing it.
// xapi-storage-script runs it as `python3 -m observer <method file> --json`
// when a xapi Observer covers the smapi component.
const standInObserver = `import runpy
import sys
import traceback


def main():
    if len(sys.argv) < 2:
        print(__file__ + ": usage: command argument list", file=sys.stderr)
        return 31
    sys.argv = sys.argv[1:]
    argv0 = sys.argv[0]
    try:
        runpy.run_path(argv0, run_name="__main__")
        return 0
    except FileNotFoundError as e:
        print("Script not found: %s" % e.filename, file=sys.stderr)
        return 2
    except Exception as e:
        print("Exception in the traced script:", file=sys.stderr)
        print(e, file=sys.stderr)
        print(traceback.format_exc(), file=sys.stderr)
        return 139


if __name__ == "__main__":
    exit_code = main()
    if exit_code:
        sys.exit(exit_code)
`

// observerInvoker calls methods the way xapi-storage-script does with an
// Observer on: python3 -m observer <method file> --json, params on stdin.
type observerInvoker struct {
	python, obsDir string
	x              *smapitest.Exec
}

func (o observerInvoker) Invoke(ctx context.Context, method string, stdin []byte) (smapitest.Reply, error) {
	path, err := o.x.Path(method)
	if errors.Is(err, smapitest.ErrScriptMissing) {
		// No file: the daemon answers by itself, the wrapper never runs.
		return o.x.Invoke(ctx, method, stdin)
	}
	if err != nil {
		return smapitest.Reply{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, o.python, "-m", "observer", path, "--json")
	cmd.Env = append(os.Environ(), "PYTHONPATH="+o.obsDir, "LUKSEXT_LOG_LEVEL=warn")
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	r := smapitest.Reply{Stdout: out.Bytes(), Stderr: errb.Bytes()}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		r.ExitCode = ee.ExitCode()
	} else if err != nil {
		return r, err
	}
	return r, nil
}

// TestRPMPayloadRunsUnderXapiObserverWrapper: the packaged method files
// (static Go executables with a __main__.py zip appended, packaging/
// runpyzip) pass the exec conformance suite when every call goes through
// python3 -m observer, and answer byte for byte what a direct exec
// answers. The RPM is the artefact checked, because rpmbuild's strip step
// would drop the appended archive.
func TestRPMPayloadRunsUnderXapiObserverWrapper(t *testing.T) {
	python := testenv.Tools(t, "python3")["python3"]
	rpm, _ := builtRPM(t)
	root := extract(t, rpm)
	obsDir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(obsDir, "observer.py"), []byte(standInObserver), 0o644))

	d := realDeps()
	for _, tc := range []struct {
		name, dir string
		table     smapi.Table
	}{
		{"volume", volumeDir, luksext.VolumeTable(d)},
		{"datapath", datapathDir, luksext.DatapathTable(d)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := &smapitest.Exec{Dir: filepath.Join(root, tc.dir), Env: []string{"LUKSEXT_LOG_LEVEL=warn"}}
			obs := observerInvoker{python: python, obsDir: obsDir, x: x}
			ctx := context.Background()
			direct, err := x.Invoke(ctx, "Plugin.Query", []byte(`{"dbg":"t"}`))
			require.NoError(t, err)
			wrapped, err := obs.Invoke(ctx, "Plugin.Query", []byte(`{"dbg":"t"}`))
			require.NoError(t, err)
			require.Equal(t, 0, wrapped.ExitCode, "stderr: %s", wrapped.Stderr)
			assert.Equal(t, string(direct.Stdout), string(wrapped.Stdout))
			assert.NotContains(t, string(wrapped.Stderr), "null bytes")
			smapitest.Run(t, smapitest.Config{Invoker: obs, Exec: x, Table: tc.table, Plugin: luksext.PluginName})
		})
	}

	// Without the archive the same call dies the way the issue saw it: the
	// test can fail.
	plain := filepath.Join(t.TempDir(), "Plugin.Query")
	b, err := os.ReadFile(filepath.Join(root, "usr/libexec/luksext/volume"))
	require.NoError(t, err)
	i := bytes.LastIndex(b, []byte("PK\x03\x04"))
	require.Greater(t, i, 0, "the packaged binary carries the zip")
	require.NoError(t, os.WriteFile(plain, b[:i], 0o755))
	cmd := exec.Command(python, "-m", "observer", plain, "--json")
	cmd.Env = append(os.Environ(), "PYTHONPATH="+obsDir)
	cmd.Stdin = strings.NewReader(`{"dbg":"t"}`)
	out, err := cmd.CombinedOutput()
	assert.Equal(t, 139, exitCode(err), "%s", out)
	assert.Contains(t, string(out), "null bytes")
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}

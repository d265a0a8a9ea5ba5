// Package host checks tests/host/acceptance.sh, the acceptance script for
// a real XCP-ng 8.3 host (it needs xapi, blktap and a spare disk, so it
// cannot run here): its syntax, shellcheck's verdict, and the refusals it
// makes before touching anything.
package host

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

func script(t *testing.T) string {
	_, file, _, ok := runtime.Caller(0)
	require.True(t, ok)
	return filepath.Join(filepath.Dir(file), "acceptance.sh")
}

func run(t *testing.T, name string, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	}
	require.NoError(t, err)
	return string(out), 0
}

func TestAcceptanceScriptSyntaxAndShellcheck(t *testing.T) {
	tools := testenv.Tools(t, "bash", "shellcheck")
	out, code := run(t, tools["bash"], "-n", script(t))
	assert.Equal(t, 0, code, "bash -n: %s", out)
	out, code = run(t, tools["shellcheck"], "-s", "bash", script(t))
	assert.Equal(t, 0, code, "shellcheck:\n%s", out)
}

func TestAcceptanceScriptRefusesBeforeTouchingAnything(t *testing.T) {
	bash := testenv.Tools(t, "bash")["bash"]
	out, code := run(t, bash, script(t), "--help")
	assert.Equal(t, 0, code, out)
	assert.Contains(t, out, "--recovery-file")
	_, code = run(t, bash, script(t), "--disk", "/dev/null")
	assert.Equal(t, 2, code, "no recovery file: usage error")

	// Stand-ins for xe and luksext that record any call: none may happen.
	bin := t.TempDir()
	calls := filepath.Join(bin, "calls")
	for _, n := range []string{"xe", "luksext"} {
		require.NoError(t, os.WriteFile(filepath.Join(bin, n), []byte("#!/bin/sh\necho \"$0 $*\" >> "+calls+"\n"), 0o755))
	}
	pw := filepath.Join(t.TempDir(), "pw")
	require.NoError(t, os.WriteFile(pw, []byte("correct horse battery"), 0o600))
	img := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(img, make([]byte, 1<<20), 0o600))
	short := filepath.Join(t.TempDir(), "short")
	require.NoError(t, os.WriteFile(short, []byte("1234"), 0o600))
	for _, tc := range []struct{ disk, file, want string }{
		{img, pw, "not a block device"},
		{"/dev/null", short, "at least 8 characters"},
	} {
		cmd := exec.Command(bash, script(t), "--disk", tc.disk, "--recovery-file", tc.file)
		cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
		b, err := cmd.CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "must fail: %s", b)
		assert.Equal(t, 2, ee.ExitCode(), "%s", b)
		assert.Contains(t, string(b), tc.want)
	}
	got, _ := os.ReadFile(calls)
	assert.Empty(t, strings.TrimSpace(string(got)), "xe/luksext were called before the refusals")
}

package run

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/secret"
)

func TestExec_StdinAndExtraFilesCarrySecrets(t *testing.T) {
	x := NewExec(nil)
	res, err := x.Run(context.Background(), Cmd{
		Tool:       "/bin/sh",
		Args:       []string{"-c", "cat; echo; cat /dev/fd/3; echo; cat /dev/fd/4"},
		Stdin:      secret.FromString("one"),
		ExtraFiles: []secret.Bytes{secret.FromString("two"), secret.FromString("three")},
	})
	require.NoError(t, err)
	assert.Equal(t, "one\ntwo\nthree", string(res.Stdout))
}

func TestExec_ExitCodeAndStderr(t *testing.T) {
	x := NewExec(nil)
	_, err := x.Run(context.Background(), Cmd{Tool: "/bin/sh", Args: []string{"-c", "echo nope >&2; exit 2"}})
	require.Error(t, err)
	assert.Equal(t, 2, ExitCode(err))
	assert.Contains(t, err.Error(), "nope")
}

func TestExec_Timeout(t *testing.T) {
	x := NewExec(nil)
	start := time.Now()
	_, err := x.Run(context.Background(), Cmd{Tool: "/bin/sleep", Args: []string{"10"}, Timeout: 200 * time.Millisecond})
	require.Error(t, err)
	assert.Less(t, time.Since(start), 8*time.Second)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, -1, ExitCode(err))
}

func TestResolve_MissingToolIsNamed(t *testing.T) {
	_, err := Paths{"frobnicate": "/nonexistent/frobnicate"}.Resolve("frobnicate")
	require.Error(t, err)
	assert.True(t, errors.Is(err, ErrToolMissing))
	assert.Contains(t, err.Error(), "frobnicate")
}

func TestResolve_ToolOutsidePathFoundInItsOwnDir(t *testing.T) {
	// As qemu-img on XCP-ng 8.3: only in /usr/lib64/xen/bin.
	assert.Equal(t, []string{"/usr/lib64/xen/bin", "/usr/lib/xen/bin"}, toolDirs["qemu-img"])
	dir := t.TempDir()
	saved := toolDirs
	t.Cleanup(func() { toolDirs = saved })
	toolDirs = map[string][]string{"luksext-dom0-only-tool": {dir}}
	_, err := Paths{}.Resolve("luksext-dom0-only-tool")
	require.ErrorIs(t, err, ErrToolMissing)
	assert.Contains(t, err.Error(), dir+"/luksext-dom0-only-tool", "the error says where it looked")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "luksext-dom0-only-tool"), []byte("#!/bin/sh\n"), 0o755))
	got, err := Paths{}.Resolve("luksext-dom0-only-tool")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "luksext-dom0-only-tool"), got)
}

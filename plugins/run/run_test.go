package run

import (
	"context"
	"errors"
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

package durable

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRenameMovesAcrossDirectories(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(a, "x"), []byte("data"), 0o600))
	require.NoError(t, Rename(filepath.Join(a, "x"), filepath.Join(b, "y")))
	got, err := os.ReadFile(filepath.Join(b, "y"))
	require.NoError(t, err)
	assert.Equal(t, "data", string(got))
	_, err = os.Stat(filepath.Join(a, "x"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestRenameAndSyncDirReportErrors(t *testing.T) {
	dir := t.TempDir()
	assert.Error(t, Rename(filepath.Join(dir, "missing"), filepath.Join(dir, "y")))
	err := SyncDir(filepath.Join(dir, "missing"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "syncing directory")
}

package luksext

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Issue 13 item 16: the SR record is root only, like the volume records.
func TestSRRecordIsRootOnly(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, writeSRMeta(dir, SRMeta{UUID: "u"}))
	st, err := os.Stat(filepath.Join(dir, SRMetaFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
}

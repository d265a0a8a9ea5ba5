package attachment

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/tapdisk"
)

// Issue 13 item 6: the in-use check compared path text, so asking about
// /run/sr-mount/<uuid> missed a volume attached as /var/run/sr-mount/<uuid>.
// Directories are compared by device and inode.
func TestInUseUnderSeesAnotherSpellingOfTheSR(t *testing.T) {
	f := newFixture(t)
	root := t.TempDir()
	sr := filepath.Join(root, "var-run", "sr-mount", "sr1")
	require.NoError(t, os.MkdirAll(sr, 0o700))
	require.NoError(t, os.Symlink(filepath.Join(root, "var-run"), filepath.Join(root, "run")))
	f.img = tapdisk.Image{Type: "vhd", Path: filepath.Join(sr, "0f4e.vhd")}
	_, err := f.m.Attach(context.Background(), f.img, "7")
	require.NoError(t, err)
	got, err := f.m.InUseUnder(filepath.Join(root, "run", "sr-mount", "sr1"))
	require.NoError(t, err)
	assert.Equal(t, []string{"0f4e.vhd"}, got)
	got, err = f.m.InUseUnder(filepath.Join(root, "run", "sr-mount"))
	require.NoError(t, err)
	assert.Empty(t, got, "the parent directory is not the SR")
}

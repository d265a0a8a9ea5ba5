package attachment

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInUseUnder(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	got, err := f.m.InUseUnder("/var/run/sr-mount/sr1")
	require.NoError(t, err)
	assert.Empty(t, got, "nothing attached yet (and no state dir)")

	_, err = f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	got, err = f.m.InUseUnder("/var/run/sr-mount/sr1")
	require.NoError(t, err)
	assert.Equal(t, []string{"0f4e.vhd"}, got)
	got, err = f.m.InUseUnder("/var/run/sr-mount/sr10")
	require.NoError(t, err)
	assert.Empty(t, got, "another SR whose path shares a prefix is not affected")

	require.NoError(t, os.WriteFile(filepath.Join(f.m.Dir, "junk.json"), []byte("{"), 0o600))
	got, err = f.m.InUseUnder("/var/run/sr-mount/sr1")
	require.NoError(t, err)
	assert.Len(t, got, 2, "an unreadable record counts as in use")
	require.NoError(t, os.Remove(filepath.Join(f.m.Dir, "junk.json")))

	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	got, err = f.m.InUseUnder("/var/run/sr-mount/sr1")
	require.NoError(t, err)
	assert.Empty(t, got)
}

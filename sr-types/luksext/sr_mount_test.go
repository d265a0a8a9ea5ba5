package luksext

import (
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/store"
)

// SR.attach invalidates SR.ls's cached allocations after its mount (the
// images may have changed while the SR was not mounted here); the store
// directories every volume call ensures (SRCheck.open) do not.
func TestMountedStoreDirsInvalidatesCachedAllocations(t *testing.T) {
	mnt := t.TempDir()
	require.NoError(t, mountedStoreDirs(mnt))
	st := store.New(mnt)
	tag, ok := st.AllocTag()
	require.True(t, ok)
	time.Sleep(20 * time.Millisecond) // directory timestamps tick coarsely
	require.NoError(t, ensureStoreDirs(mnt))
	now, _ := st.AllocTag()
	require.Equal(t, tag, now, "a volume call's handle check")
	require.NoError(t, mountedStoreDirs(mnt))
	now, _ = st.AllocTag()
	require.NotEqual(t, tag, now, "SR.attach")
	_, err := os.Stat(st.Path("gc"))
	require.NoError(t, err)
}

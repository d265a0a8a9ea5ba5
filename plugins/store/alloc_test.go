package store

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func allocTag(t *testing.T, s Store) string {
	t.Helper()
	tag, ok := s.AllocTag()
	require.True(t, ok)
	return tag
}

// Every event after which a cached allocation may be wrong changes the
// allocation tag; nothing else does.
func TestAllocTagChangesWithEveryInvalidation(t *testing.T) {
	s := New(t.TempDir())
	require.NoError(t, os.MkdirAll(s.Dir(), 0o700))
	boot := filepath.Join(t.TempDir(), "boot_id")
	require.NoError(t, os.WriteFile(boot, []byte("0b5c1a0e-8a4f-4e57-9a43-4c9c2f7d2d10\n"), 0o444))
	defer func(p string) { bootIDPath = p }(bootIDPath)
	bootIDPath = boot

	tag := allocTag(t, s)
	require.Equal(t, tag, allocTag(t, s), "stable while nothing happens")
	n := Node{ID: NewID(), Format: FormatVHD, VirtualSize: 1, VDI: &VDI{}}
	time.Sleep(20 * time.Millisecond) // directory timestamps tick coarsely (jiffies)
	require.NoError(t, os.WriteFile(filepath.Join(s.SR, n.File()), []byte("x"), 0o600))
	changed := func(what string) {
		t.Helper()
		now := allocTag(t, s)
		require.NotEqual(t, tag, now, what)
		tag = now
		require.Equal(t, tag, allocTag(t, s), "%s: stable again", what)
	}
	changed("an image created in the SR root")
	require.NoError(t, s.InvalidateAllocation())
	changed("InvalidateAllocation")
	require.NoError(t, os.WriteFile(boot, []byte("9e8e05e5-5d7c-4a7b-a7ad-38c84f0b5e06\n"), 0o444))
	changed("a new boot")
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, os.Rename(filepath.Join(s.SR, n.File()), filepath.Join(s.SR, "x.vhd")))
	changed("an image renamed by hand")
	require.NoError(t, s.Put(n))
	require.Equal(t, tag, allocTag(t, s), "a record change is the listing tag's business")

	require.NoError(t, os.WriteFile(boot, []byte("not a boot id"), 0o444))
	_, ok := s.AllocTag()
	require.False(t, ok, "an unreadable boot id: no allocation may be served from a cache")
	require.NoError(t, os.WriteFile(s.allocPath(), nil, 0o600))
	bootIDPath = "/proc/sys/kernel/random/boot_id"
	_, ok = s.AllocTag()
	require.False(t, ok, "an empty epoch file (created, not yet written)")
}

func TestAllocTagOfTheHost(t *testing.T) {
	s := New(t.TempDir())
	require.NoError(t, os.MkdirAll(s.Dir(), 0o700))
	a := allocTag(t, s) // creates the epoch
	require.FileExists(t, s.allocPath())
	require.Equal(t, a, allocTag(t, s))
}

// An SR that is not mounted has no cache to invalidate (SR.attach
// invalidates at mount): the datapath's teardown must not fail there.
func TestInvalidateAllocationOfAnUnmountedSR(t *testing.T) {
	s := New(filepath.Join(t.TempDir(), "gone"))
	require.NoError(t, s.InvalidateAllocation())
	s = New(t.TempDir()) // a mountpoint directory without the store
	require.NoError(t, s.InvalidateAllocation())
	require.NoFileExists(t, s.allocPath())
}

// ListingTag names the records a Listing is of: equal while they are
// unchanged, different after any change.
func TestListingTagFollowsTheRecords(t *testing.T) {
	s := New(t.TempDir())
	require.NoError(t, os.MkdirAll(s.Dir(), 0o700))
	n := Node{ID: NewID(), Format: FormatVHD, VirtualSize: 1, VDI: &VDI{Name: "a"}}
	require.NoError(t, s.Put(n))
	for _, what := range []string{"built from the records", "from the cache"} {
		l, err := s.Listing()
		require.NoError(t, err)
		tag, ok := s.ListingTag()
		require.True(t, ok)
		require.Equal(t, tag, l.Tag, what)
	}
	before, _ := s.ListingTag()
	n.VDI.Name = "b"
	require.NoError(t, s.Put(n))
	after, _ := s.ListingTag()
	require.NotEqual(t, before, after)
	require.True(t, Derived(filepath.Join(MetaDir, allocFile)) && Derived(filepath.Join(MetaDir, volumesFile)))
}

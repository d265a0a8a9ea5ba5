package store

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The allocation tag lets SR.ls serve a VDI's physical_utilisation (the
// leaf's st_blocks) from a cache instead of one stat per leaf, which at
// 10 000 volumes is most of the call. A cached allocation is believed
// only when the tag it was built under equals the current one; the tag
// is made of:
//
//   - the allocation epoch, 16 random bytes in <sr>/.luksext/alloc.gen,
//     rewritten by InvalidateAllocation before (never after) anything
//     changes a leaf image outside a tapdisk, and by the datapath after a
//     tapdisk that had a leaf open is torn down, before its record goes;
//   - the boot id (/proc/sys/kernel/random/boot_id): the epoch is written
//     without fsync, and a host crash (the only way to lose the write)
//     also kills the tapdisks and the datapath records on tmpfs, so every
//     allocation must be stat'ed again after a reboot anyway;
//   - the SR root directory's inode, mtime and ctime, which change when
//     any file in it is created, renamed or removed, by us or by a person
//     (an image edited in place by hand is not seen; use Volume.stat).
//
// SR.attach bumps the epoch too (the SR may have been written while it
// was not mounted here). Images a tapdisk may have open are never served
// from the cache: the caller stats every image that has a datapath record
// (written before tapdisk opens it, removed after the epoch bump that
// follows its close).
const allocFile = "alloc.gen"

// bootIDPath is the kernel's boot id (a variable for tests).
var bootIDPath = "/proc/sys/kernel/random/boot_id"

func (s Store) allocPath() string { return filepath.Join(s.Dir(), allocFile) }

// InvalidateAllocation makes every cached allocation of the SR stale. It
// must run before a leaf image changes (resize, snapshot, GC re-parent or
// leaf-coalesce) and after a tapdisk that had one open closed it. No
// fsync: see above. An SR whose metadata directory is absent (not
// mounted) has no cache to invalidate; SR.attach invalidates at mount.
func (s Store) InvalidateAllocation() error {
	f, err := os.OpenFile(s.allocPath(), os.O_WRONLY|os.O_CREATE, 0o600)
	if errors.Is(err, os.ErrNotExist) {
		if _, derr := os.Stat(s.Dir()); errors.Is(derr, os.ErrNotExist) {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("invalidating the SR's cached allocations: %w", err)
	}
	defer f.Close()
	var g [16]byte
	if _, err := rand.Read(g[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	if _, err := f.WriteAt(g[:], 0); err != nil {
		return fmt.Errorf("invalidating the SR's cached allocations: %w", err)
	}
	return nil
}

// AllocTag returns the current allocation tag (see above) as an opaque
// string, or ok=false when it cannot be read (then nothing may be served
// from a cache). A missing epoch file is created.
func (s Store) AllocTag() (tag string, ok bool) {
	var b [16 + 16 + 24]byte
	id, err := os.ReadFile(bootIDPath)
	if err != nil {
		return "", false
	}
	boot, err := hex.DecodeString(string(dropDashes(id)))
	if err != nil || len(boot) != 16 {
		return "", false
	}
	copy(b[16:], boot)
	f, err := os.Open(s.allocPath())
	if errors.Is(err, os.ErrNotExist) {
		if s.InvalidateAllocation() != nil {
			return "", false
		}
		f, err = os.Open(s.allocPath())
	}
	if err != nil {
		return "", false
	}
	n, _ := f.ReadAt(b[:16], 0)
	f.Close()
	if n != 16 { // e.g. created but not yet written by InvalidateAllocation
		return "", false
	}
	var st unix.Stat_t
	if unix.Stat(s.SR, &st) != nil {
		return "", false
	}
	// A file system remounted read-only (after an error) takes no epoch
	// bump: nothing may be served from a cache then.
	var fs unix.Statfs_t
	if unix.Statfs(s.SR, &fs) != nil || fs.Flags&unix.ST_RDONLY != 0 {
		return "", false
	}
	binary.LittleEndian.PutUint64(b[32:], st.Ino)
	binary.LittleEndian.PutUint64(b[40:], uint64(st.Mtim.Nano()))
	binary.LittleEndian.PutUint64(b[48:], uint64(st.Ctim.Nano()))
	return string(b[:]), true
}

func dropDashes(b []byte) []byte {
	out := make([]byte, 0, 32)
	for _, c := range b {
		if c != '-' && c != '\n' {
			out = append(out, c)
		}
	}
	return out
}

// ListingTag returns the records' current tag (generation and nodes
// directory stat) as an opaque string, equal to Listing.Tag of a listing
// of the same records; ok=false when it cannot be read.
func (s Store) ListingTag() (string, bool) {
	t, ok := s.currentTag(false)
	if !ok {
		return "", false
	}
	return t.String(), true
}

// String encodes the tag (Listing.Tag, ListingTag).
func (t listingTag) String() string {
	b := make([]byte, 0, 40)
	b = append(b, t.gen[:]...)
	b = binary.LittleEndian.AppendUint64(b, t.ino)
	b = binary.LittleEndian.AppendUint64(b, uint64(t.mtime))
	b = binary.LittleEndian.AppendUint64(b, uint64(t.ctime))
	return string(b)
}

// VolumesCachePath is the file in which the SR type keeps what SR.ls
// renders (derived data, like the listing cache: see Derived).
func (s Store) VolumesCachePath() string { return filepath.Join(s.Dir(), volumesFile) }

const volumesFile = "volumes.cache"

// SaveVolumesCache replaces the volumes cache atomically (no fsync: a
// torn or old file fails its owner's checks).
func (s Store) SaveVolumesCache(b []byte) error { return s.saveDerived(volumesFile, b) }

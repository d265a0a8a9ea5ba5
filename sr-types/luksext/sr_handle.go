package luksext

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
)

// SRCheck proves that the sr argument of an SR.* or Volume.* call names an
// attached luksext SR, and keeps it attached for the call: the one place
// that turns a caller's string into a directory we write to.
//
// An SR handle is exactly <MountRoot>/<sr uuid> (another spelling of the
// same directory, e.g. /run/sr-mount/<uuid> when /var/run is a link to
// /run, names the same SR), the mountpoint itself is a directory and not a
// symlink, the filesystem mounted there comes from
// <MapperDir>/luksext-<sr uuid> (read from mountinfo, never guessed), and
// its SR record names the same uuid. All of it is checked under a lock on
// <StateDir>/<sr uuid>.lock, the file SR.attach, SR.detach and SR.destroy
// hold exclusively: a Volume.create racing SR.detach either finishes on the
// mounted SR or finds it unmounted, never writes under a bare mountpoint.
// Nothing is created under the mountpoint before the check passed.
//
// The zero value checks the host's real paths.
type SRCheck struct {
	MountRoot string // /var/run/sr-mount
	StateDir  string // /run/luksext: lock files, outside every SR
	MountInfo string // /proc/self/mountinfo
	MapperDir string // /dev/mapper
	// Backs reports whether the block device lower is under the dm device
	// upper; nil reads sysfs (/sys/dev/block/<maj:min>/slaves). Not
	// serialised: a test handing the check to a child process gets sysfs.
	Backs func(lower, upper string) (bool, error) `json:"-"`
}

func (c SRCheck) backs(lower, upper string) (bool, error) {
	if c.Backs != nil {
		return c.Backs(lower, upper)
	}
	return backs(lower, upper, "/sys")
}

func (c SRCheck) withDefaults() SRCheck {
	if c.MountRoot == "" {
		c.MountRoot = DefaultMountRoot
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.MountInfo == "" {
		c.MountInfo = "/proc/self/mountinfo"
	}
	if c.MapperDir == "" {
		c.MapperDir = "/dev/mapper"
	}
	return c
}

// srHandle is a checked SR: Path is the canonical mountpoint.
type srHandle struct {
	UUID, Path string
	Meta       SRMeta
}

// lockFile is the per-SR lock shared by SR.* (exclusive) and Volume.*
// (shared).
func srLockFile(stateDir, srUUID string) string {
	return filepath.Join(stateDir, srUUID+".lock")
}

// parse turns sr into the SR uuid and the canonical mountpoint, by syntax
// and by resolving the parent directory; it reads no SR state.
func (c SRCheck) parse(sr string) (string, string, error) {
	c = c.withDefaults()
	bad := smapi.Errorf(smapi.KindSRNotAttached, "%q is not a luksext SR handle (%s/<sr uuid>)", sr, c.MountRoot)
	if sr == "" || !filepath.IsAbs(sr) {
		return "", "", bad
	}
	clean := filepath.Clean(sr)
	u := filepath.Base(clean)
	if !validUUID(u) {
		return "", "", bad
	}
	root := filepath.Clean(c.MountRoot)
	if filepath.Dir(clean) != root {
		// Another spelling of the mount root (/run/sr-mount for
		// /var/run/sr-mount): the same directory once links are resolved.
		want, err1 := filepath.EvalSymlinks(root)
		got, err2 := filepath.EvalSymlinks(filepath.Dir(clean))
		if err1 != nil || err2 != nil || want != got {
			return "", "", bad
		}
	}
	return u, filepath.Join(root, u), nil
}

// verify checks the mount itself; the caller holds the SR lock.
func (c SRCheck) verify(srUUID, mnt string) (srHandle, error) {
	c = c.withDefaults()
	h := srHandle{UUID: srUUID, Path: mnt}
	notAttached := func(why string, a ...any) error {
		return smapi.Errorf(smapi.KindSRNotAttached, "SR %s is not attached here: %s", srUUID, fmt.Sprintf(why, a...))
	}
	st, err := os.Lstat(mnt)
	if err != nil {
		return h, notAttached("%s does not exist", mnt)
	}
	if st.Mode()&os.ModeSymlink != 0 {
		return h, smapi.Errorf(smapi.KindNeedsAttention, "SR mountpoint %s is a symbolic link; luksext never makes one (remove it: rm %s)", mnt, mnt)
	}
	if !st.IsDir() {
		return h, notAttached("%s is not a directory", mnt)
	}
	src, mounted, err := (&fs.FS{MountInfo: c.MountInfo}).MountedAt(mnt)
	if err != nil {
		return h, err
	}
	if !mounted {
		return h, notAttached("nothing is mounted at %s", mnt)
	}
	mapper := filepath.Join(c.MapperDir, luks.SRName(srUUID))
	// The lvm layout (an SR adopted from SMAPIv1) mounts the logical
	// volume, which must sit on the SR's mapping.
	lv := filepath.Join(c.MapperDir, lvm.DMName(VGName(srUUID), srUUID))
	layout := LayoutDirect
	switch {
	case sameBlockDevice(src, mapper):
	case sameBlockDevice(src, lv):
		if ok, err := c.backs(mapper, lv); err != nil || !ok {
			return h, smapi.Errorf(smapi.KindNeedsAttention, "%s is mounted from %s, which is not on the SR's mapping %s (%v); unmount it (umount %s) and plug the SR again", mnt, src, mapper, err, mnt)
		}
		layout = LayoutLVM
	default:
		return h, smapi.Errorf(smapi.KindNeedsAttention, "%s is mounted from %s, not from the SR's mapping %s; unmount it (umount %s) and plug the SR again", mnt, src, mapper, mnt)
	}
	meta, err := readSRMeta(mnt)
	if err != nil {
		return h, err
	}
	if meta.UUID != srUUID {
		return h, smapi.Errorf(smapi.KindNeedsAttention, "the SR record %s names SR %q, not %s", filepath.Join(mnt, SRMetaFile), meta.UUID, srUUID)
	}
	if meta.Layout != layout {
		return h, smapi.Errorf(smapi.KindNeedsAttention, "SR %s records layout %q but is mounted from %s; unmount it (umount %s) and plug the SR again", srUUID, meta.Layout, src, mnt)
	}
	h.Meta = meta
	return h, nil
}

// sameBlockDevice: the mount source names the mapping (the path we gave
// mount), or a node of the same block device.
func sameBlockDevice(src, want string) bool {
	if src == want {
		return true
	}
	var a, b syscall.Stat_t
	return syscall.Stat(src, &a) == nil && syscall.Stat(want, &b) == nil &&
		a.Mode&syscall.S_IFMT == syscall.S_IFBLK && b.Mode&syscall.S_IFMT == syscall.S_IFBLK && a.Rdev == b.Rdev
}

// open checks sr and holds the SR lock shared until release: the SR stays
// mounted for the whole call. It then makes the store's own directories
// (locks, gc) on the verified filesystem.
func (c SRCheck) open(ctx context.Context, sr string, timeout time.Duration) (srHandle, func(), error) {
	c = c.withDefaults()
	srUUID, mnt, err := c.parse(sr)
	if err != nil {
		return srHandle{}, nil, err
	}
	l, err := acquireSRLock(ctx, c.StateDir, srUUID, lock.Shared, timeout)
	if err != nil {
		return srHandle{}, nil, err
	}
	release := func() { _ = l.Release() }
	h, err := c.verify(srUUID, mnt)
	if err == nil {
		err = ensureStoreDirs(mnt)
	}
	if err != nil {
		release()
		return srHandle{}, nil, err
	}
	return h, release, nil
}

// ensureStoreDirs makes the store's lock and GC directories (plugins/lock
// creates no directory: it must never recreate a tree under a mountpoint
// whose filesystem is gone). Called only on a verified, locked SR.
func ensureStoreDirs(mnt string) error {
	st := store.New(mnt)
	for _, d := range []string{st.Dir(), st.Path("locks"), st.Path("gc")} {
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

// mountedStoreDirs is ensureStoreDirs for SR.attach right after its
// mount. The images may have been written while the SR was not mounted
// here (by hand, or by a tapdisk that died and whose record a detach
// never tore down): SR.ls's cached allocations are invalidated, and its
// first call stats every leaf again (volume_ls.go).
func mountedStoreDirs(mnt string) error {
	if err := ensureStoreDirs(mnt); err != nil {
		return err
	}
	return store.New(mnt).InvalidateAllocation()
}

// acquireSRLock takes <stateDir>/<uuid>.lock in mode, waiting at most
// timeout (and the call's deadline).
func acquireSRLock(ctx context.Context, stateDir, srUUID string, mode lock.Mode, timeout time.Duration) (*lock.Lock, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, err
	}
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	path := srLockFile(stateDir, srUUID)
	l, err := lock.Acquire(ctx, path, mode, smapi.Logger(ctx))
	if errors.Is(err, lock.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return nil, smapi.Errorf(smapi.KindInUse, "another operation on SR %s is still running (lock %s)", srUUID, path)
	}
	return l, err
}

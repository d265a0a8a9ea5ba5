package fs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Mounter is mount(2) and umount(2): the edge tests replace.
type Mounter interface {
	// Mount mounts the filesystem of type fstype on source at target,
	// with no flags and no options.
	Mount(source, target, fstype string) error
	// Unmount unmounts target (no flags: a busy filesystem stays).
	Unmount(target string) error
}

// KernelMounter calls the kernel directly. `mount -t ext4 DEV DIR` does no
// more than this for our SRs: no fstab entry, no options, no helper
// (/sbin/mount.ext4 does not exist), no mtab file to write (/etc/mtab is a
// link to /proc/self/mounts on XCP-ng 8.3 as on every systemd host), and
// libmount's only other work, canonicalising the source, is done by Mount
// below. Calling the kernel spares every SR.attach an exec of mount(8)
// (~90 ms in the TCG guest of make bench, most of the mount step), and
// umount(8) likewise at SR.detach.
type KernelMounter struct{}

// Mount is mount(2).
func (KernelMounter) Mount(source, target, fstype string) error {
	return unix.Mount(source, target, fstype, 0, "")
}

// Unmount is umount(2), never through a symbolic link at target.
func (KernelMounter) Unmount(target string) error { return unix.Unmount(target, unix.UMOUNT_NOFOLLOW) }

func (f *FS) sys() Mounter {
	if f.Sys == nil {
		return KernelMounter{}
	}
	return f.Sys
}

// canonicalDevice names a device-mapper device as libmount would before
// mount(2) (lib/canonicalize.c canonicalize_dm_name): a path resolving to
// /dev/dm-N becomes /dev/mapper/<name>, so the lvm layout's
// /dev/<vg>/<lv> shows in /proc/mounts, df and findmnt as it did when
// mount(8) mounted it. Anything else is used as given.
func canonicalDevice(dev string) string {
	real, err := filepath.EvalSymlinks(dev)
	if err != nil || !strings.HasPrefix(real, "/dev/dm-") {
		return dev
	}
	name, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(real), "dm", "name"))
	if err != nil {
		return dev
	}
	mapper := filepath.Join("/dev/mapper", strings.TrimSpace(string(name)))
	if sameDevice(mapper, real) {
		return mapper
	}
	return dev
}

// mountError says what mount(2)'s errno means for an SR, in the words
// mount(8) would have used.
func mountError(dev, dir string, err error) error {
	var why string
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("mounting %s at %s: %s is already mounted or %s is busy: %w", dev, dir, dev, dir, ErrBusy)
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EUCLEAN):
		why = "not an ext4 filesystem, or its superblock is damaged (dmesg says which; e2fsck -f " + dev + " may repair it)"
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENOTBLK), errors.Is(err, unix.ENXIO):
		why = "the device does not exist or is not a block device"
	case errors.Is(err, unix.ENODEV):
		why = "this kernel has no ext4 support (modprobe ext4)"
	case errors.Is(err, unix.EROFS), errors.Is(err, unix.EACCES):
		why = "the device is read-only"
	default:
		why = "the kernel refused"
	}
	return fmt.Errorf("mounting %s at %s: %s: %w", dev, dir, why, err)
}

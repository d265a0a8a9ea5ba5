package blockdev

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// ErrInUse: the kernel refuses exclusive access to the device.
var ErrInUse = errors.New("device is in use")

// CheckExclusive fails with ErrInUse while path is a block device that is
// mounted, a swap, or held by device-mapper, md or LVM (the kernel's
// O_EXCL rule for block devices, fs/block_dev.c bd_prepare_to_claim). It
// writes nothing: SR.create calls it before its first write.
func CheckExclusive(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_EXCL, 0)
	if err != nil {
		return openError(path, "for exclusive use", err)
	}
	return f.Close()
}

func openError(path, why string, err error) error {
	switch {
	case errors.Is(err, syscall.EBUSY):
		return fmt.Errorf("%s is in use (mounted, a swap device, or part of a device-mapper, LVM or md RAID device); unmount or release it first (lsblk %s; findmnt %s): %w", path, path, path, ErrInUse)
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%s: %w", path, ErrDeviceNotFound)
	}
	return fmt.Errorf("opening %s %s: %w", path, why, err)
}

// Regions Wipe zeroes. The head covers every signature ProbeMagic knows,
// including the last LUKS2 secondary-header position (4 MiB) and a default
// LUKS2 header plus keyslot area; the tail covers the GPT backup header and
// the md 0.90/1.0 superblocks.
const (
	wipeHead = 16 << 20
	wipeTail = 1 << 20
)

// Wipe zeroes the start and the end of path so that no signature survives,
// then flushes. It does not touch the middle of the device: old data
// there is unreadable without the old metadata, and zeroing a whole disk
// would take hours.
//
// The device is opened O_EXCL, which the kernel refuses (EBUSY) while the
// block device is mounted, a swap, or held by device-mapper, md or LVM: a
// disk in use is never wiped, force or not.
func Wipe(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_EXCL, 0)
	if err != nil {
		return openError(path, "to wipe it", err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("sizing %s: %w", path, err)
	}
	if err := ZeroRange(f, 0, min(size, wipeHead)); err != nil {
		return err
	}
	if size > wipeHead {
		start := max(wipeHead, size-wipeTail)
		if err := ZeroRange(f, start, size-start); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flushing %s: %w", path, err)
	}
	return nil
}

// ZeroRange writes n zero bytes at off.
func ZeroRange(f *os.File, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		chunk := min(n, int64(len(buf)))
		if _, err := f.WriteAt(buf[:chunk], off); err != nil {
			return fmt.Errorf("zeroing %s at %d: %w", f.Name(), off, err)
		}
		off += chunk
		n -= chunk
	}
	return nil
}

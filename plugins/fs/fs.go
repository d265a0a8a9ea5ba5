// Package fs does the ext4 and mount work of an SR: mkfs, fsck, mount,
// unmount, "is this mounted", and space figures. mkfs and e2fsck go through
// a run.Runner; mount and unmount are the kernel's calls (a Mounter); mount
// state is read from /proc/self/mountinfo, never guessed.
package fs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/luksext/luksext/plugins/run"
)

// Error kinds.
var (
	// ErrBusy: the filesystem is still in use (open files, a tapdisk).
	ErrBusy = errors.New("filesystem is busy")
	// ErrCorrupt: fsck found errors it could not repair on its own.
	ErrCorrupt = errors.New("filesystem has errors fsck could not repair automatically")
)

// FS runs the filesystem tools.
type FS struct {
	Run run.Runner
	// MountInfo is /proc/self/mountinfo; tests point it elsewhere.
	MountInfo string
	// Sys mounts and unmounts; nil is the kernel (KernelMounter).
	Sys Mounter
}

// New returns an FS on r.
func New(r run.Runner) *FS { return &FS{Run: r, MountInfo: "/proc/self/mountinfo"} }

// Mkfs creates an ext4 filesystem on dev. -F: dev is a dm-crypt mapping we
// just created, never a user's disk (the disk was checked for signatures
// before LUKS went on it).
func (f *FS) Mkfs(ctx context.Context, dev string) error {
	// The features come from the host's /etc/mke2fs.conf. XCP-ng 8.3 ships
	// e2fsprogs 1.47.0 with upstream's file: ext4 gets metadata_csum_seed
	// (INCOMPAT, kernels >= 4.4) and orphan_file (COMPAT: older kernels
	// ignore it), both fine for dom0's kernel 4.19; tests/e2e
	// TestDom0Matrix checks an SR made with that file.
	_, err := f.Run.Run(ctx, run.Cmd{Tool: "mkfs.ext4", Args: []string{"-F", "-q", dev}, Timeout: 30 * time.Minute})
	if err != nil {
		return fmt.Errorf("creating the ext4 filesystem on %s: %w", dev, err)
	}
	return nil
}

// Fsck checks dev before it is mounted, repairing what e2fsck repairs
// safely on its own (-p). Exit 1 means "errors corrected", fine to mount.
func (f *FS) Fsck(ctx context.Context, dev string) (repaired bool, err error) {
	if clean, _ := cleanExt4(dev, time.Now()); clean {
		return false, nil
	}
	_, err = f.Run.Run(ctx, run.Cmd{Tool: "e2fsck", Args: []string{"-p", dev}, Timeout: 2 * time.Hour})
	switch code := run.ExitCode(err); {
	case err == nil:
		return false, nil
	case code == 1:
		return true, nil
	case code >= 2:
		return false, fmt.Errorf("e2fsck -p %s exited %d: %w (run e2fsck -f on /dev/mapper device by hand, then plug the SR again)", dev, code, ErrCorrupt)
	default:
		return false, fmt.Errorf("checking the filesystem on %s: %w", dev, err)
	}
}

// Mount mounts the ext4 on dev at dir (created if needed). Already mounted
// there is success.
func (f *FS) Mount(ctx context.Context, dev, dir string) error {
	if src, ok, err := f.MountedAt(dir); err != nil {
		return err
	} else if ok {
		if sameDevice(src, dev) {
			return nil
		}
		return fmt.Errorf("%s is already mounted from %s, not %s: %w", dir, src, dev, ErrBusy)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	src := canonicalDevice(dev)
	if err := f.sys().Mount(src, dir, "ext4"); err != nil {
		return mountError(src, dir, err)
	}
	// An SR's files are decrypted VM disks and their metadata: root only
	// (mkfs.ext4 makes the root directory 0755; xapi-storage-script and
	// tapdisk run as root).
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("restricting %s to root: %w", dir, err)
	}
	return nil
}

// Unmount unmounts dir and removes it; not mounted (or absent) is success.
func (f *FS) Unmount(ctx context.Context, dir string) error {
	_, ok, err := f.MountedAt(dir)
	if err != nil {
		return err
	}
	if ok {
		if err := f.sys().Unmount(dir); err != nil {
			// umount also fails for "not mounted" (a race with another
			// detach): only a mount that is still there is an error.
			if _, still, merr := f.MountedAt(dir); merr != nil || still {
				return fmt.Errorf("unmounting %s: %w: %v", dir, ErrBusy, err)
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing mountpoint %s: %w", dir, err)
	}
	return nil
}

// MountedAt returns the source device of the filesystem mounted at dir.
func (f *FS) MountedAt(dir string) (source string, mounted bool, err error) {
	want, err := filepath.Abs(dir)
	if err != nil {
		return "", false, err
	}
	if r, err := filepath.EvalSymlinks(want); err == nil {
		want = r
	}
	file, err := os.Open(f.MountInfo)
	if err != nil {
		return "", false, fmt.Errorf("reading mount table: %w", err)
	}
	defer file.Close()
	s := bufio.NewScanner(file)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		// id parent maj:min root mountpoint options ... - fstype source superopts
		fields := strings.Fields(s.Text())
		if len(fields) < 10 {
			continue
		}
		if unescape(fields[4]) != want {
			continue
		}
		for i, fld := range fields {
			if fld == "-" && i+2 < len(fields) {
				source = unescape(fields[i+2])
			}
		}
		mounted = true // the last (top) mount wins
	}
	return source, mounted, s.Err()
}

// Space is what statvfs says about a mounted filesystem, in bytes.
type Space struct {
	Total, Free int64
}

// Statvfs reports the filesystem's size and free space (available to
// unprivileged writers, as xapi shows it).
func Statvfs(dir string) (Space, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return Space{}, fmt.Errorf("statvfs %s: %w", dir, err)
	}
	return Space{Total: int64(st.Blocks) * st.Bsize, Free: int64(st.Bavail) * st.Bsize}, nil
}

func sameDevice(a, b string) bool {
	if a == b {
		return true
	}
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	if err1 == nil && err2 == nil && ra == rb {
		return true
	}
	var sa, sb syscall.Stat_t
	return syscall.Stat(a, &sa) == nil && syscall.Stat(b, &sb) == nil && sa.Rdev == sb.Rdev && sa.Rdev != 0
}

// unescape undoes mountinfo's octal escapes (\040 for space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

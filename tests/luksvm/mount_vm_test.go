package luksvm

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/fs"
)

// testKernelMount: fs.FS mounts with mount(2), not mount(8), and must
// name the source as mount(8) did: a link to a device-mapper device (the
// lvm layout's /dev/<vg>/<lv>) mounts as /dev/mapper/<name> in
// mountinfo; a device without ext4 is refused in words; an existing mount
// of the same device is success; Unmount does not follow a link planted
// in place of the mountpoint; Unmount removes the mountpoint.
func testKernelMount(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join("/run", "luksvm-mount.img")
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	t.Cleanup(func() { os.Remove(img) })
	require.NoError(t, os.Truncate(img, 16<<20))
	mustSh(t, "", "modprobe", "loop")
	loop := strings.TrimSpace(mustSh(t, "", "losetup", "--find", "--show", img))
	t.Cleanup(func() { sh(t, "", "losetup", "-d", loop) })
	const name = "luksvm-mount-test"
	mustSh(t, "", "dmsetup", "create", name, "--table", "0 32768 linear "+loop+" 0")
	t.Cleanup(func() { sh(t, "", "dmsetup", "remove", "--retry", name) })
	mustSh(t, "", "udevadm", "settle")
	mapper := "/dev/mapper/" + name
	var st unix.Stat_t
	require.NoError(t, unix.Stat(mapper, &st))
	link := filepath.Join(dir, "vg-lv")
	require.NoError(t, os.Symlink("/dev/dm-"+strconv.Itoa(int(unix.Minor(st.Rdev))), link))

	f := fs.New(nil)
	ctx := context.Background()
	mnt := filepath.Join(dir, "mnt")
	err := f.Mount(ctx, link, mnt)
	require.Error(t, err, "no filesystem yet")
	assert.Contains(t, err.Error(), "not an ext4 filesystem")

	mustSh(t, "", "mkfs.ext4", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", mapper)
	require.NoError(t, f.Mount(ctx, link, mnt))
	src, ok, err := f.MountedAt(mnt)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, mapper, src, "mountinfo names the mapping, as mount(8) did")
	assert.Equal(t, mapper, strings.TrimSpace(mustSh(t, "", "findmnt", "-n", "-o", "SOURCE", mnt)))
	require.NoError(t, f.Mount(ctx, mapper, mnt), "already mounted from the same device: success")

	planted := filepath.Join(dir, "planted")
	require.NoError(t, os.Symlink(mnt, planted))
	require.Error(t, fs.KernelMounter{}.Unmount(planted), "a link is not followed")
	_, ok, _ = f.MountedAt(mnt)
	require.True(t, ok, "still mounted")

	require.NoError(t, f.Unmount(ctx, mnt))
	_, ok, err = f.MountedAt(mnt)
	require.NoError(t, err)
	assert.False(t, ok)
	_, err = os.Stat(mnt)
	assert.True(t, os.IsNotExist(err), "the mountpoint is removed")
	require.NoError(t, f.Unmount(ctx, mnt), "again: nothing to do")
}

package volumes

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
)

// attachedSR makes what SR.attach leaves behind, as far as SRCheck can
// see: an ext4 filesystem on a loop device mounted at
// /var/run/sr-mount/<uuid>, and /dev/mapper/luksext-<uuid> a block device
// node of that same device (SR.attach's mapping is dm-crypt; this
// machine's kernel has loop devices but no device-mapper, and SRCheck
// accepts a mount source that is the same block device as the mapping).
// The executable then runs its real, unmodified handle check. Everything
// is undone at the end of the test. Returns the SR handle.
func attachedSR(t *testing.T, sizeMiB, inodes int) string {
	t.Helper()
	testenv.Root(t)
	tools := testenv.Tools(t, "losetup", "mkfs.ext4", "mount", "umount")
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(tools[name], args...).CombinedOutput()
		require.NoError(t, err, "%s %v: %s", name, args, out)
		return strings.TrimSpace(string(out))
	}
	u := store.NewID()
	img := filepath.Join(t.TempDir(), "sr.img")
	f, err := os.Create(img)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(int64(sizeMiB)<<20))
	require.NoError(t, f.Close())
	run("mkfs.ext4", "-q", "-F", "-N", itoa(inodes), img)
	loop := run("losetup", "--find", "--show", img)
	t.Cleanup(func() { _ = exec.Command(tools["losetup"], "-d", loop).Run() })

	mnt := filepath.Join(luksext.DefaultMountRoot, u)
	require.NoError(t, os.MkdirAll(mnt, 0o755))
	t.Cleanup(func() { _ = os.Remove(mnt) })
	run("mount", "-t", "ext4", loop, mnt)
	t.Cleanup(func() { _ = exec.Command(tools["umount"], mnt).Run() })

	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(loop, &st))
	require.NoError(t, os.MkdirAll("/dev/mapper", 0o755))
	node := filepath.Join("/dev/mapper", "luksext-"+u)
	require.NoError(t, syscall.Mknod(node, syscall.S_IFBLK|0o600, int(st.Rdev)))
	t.Cleanup(func() { _ = os.Remove(node) })
	t.Cleanup(func() { _ = os.Remove(filepath.Join(luksext.DefaultStateDir, u+".lock")) })

	b, _ := json.Marshal(luksext.SRMeta{Schema: 1, UUID: u, Name: "bench SR"})
	require.NoError(t, os.WriteFile(filepath.Join(mnt, luksext.SRMetaFile), b, 0o600))
	return mnt
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

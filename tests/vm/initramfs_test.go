package vm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

// The cpio writer is checked by an independent reader: busybox cpio
// extracts what it wrote.
func TestCpioArchiveExtractsWithBusybox(t *testing.T) {
	tools := testenv.Tools(t, "busybox")
	var buf bytes.Buffer
	w := newCpioWriter(&buf)
	w.dir("bin", 0o755)
	w.file("bin/hello", 0o755, []byte("#!/bin/sh\necho hi\n"))
	w.file("odd-len", 0o644, []byte("abc"))
	require.NoError(t, w.close())
	require.Zero(t, buf.Len()%4, "newc entries are 4-byte aligned")

	dir := t.TempDir()
	cmd := exec.Command(tools["busybox"], "cpio", "-i", "-d")
	cmd.Dir = dir
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	b, err := os.ReadFile(filepath.Join(dir, "bin/hello"))
	require.NoError(t, err)
	assert.Equal(t, "#!/bin/sh\necho hi\n", string(b))
	st, err := os.Stat(filepath.Join(dir, "bin/hello"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), st.Mode().Perm())
	b, err = os.ReadFile(filepath.Join(dir, "odd-len"))
	require.NoError(t, err)
	assert.Equal(t, "abc", string(b))
}

func TestModuleLoadOrderPutsDependenciesFirst(t *testing.T) {
	dir := t.TempDir()
	dep := "kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko\n" +
		"kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/net/9p/9pnet.ko:\n" +
		"kernel/fs/netfs/netfs.ko:\n" +
		"kernel/drivers/virtio/virtio_ring.ko:\n" +
		"kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n" +
		"kernel/drivers/md/dm-mod.ko:\n"
	require.NoError(t, os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/drivers/virtio/virtio_pci.ko\n"), 0o644))

	order, err := moduleLoadOrder(dir, []string{"virtio_pci", "9pnet_virtio", "9p", "dm_crypt"})
	require.NoError(t, err)
	assert.Equal(t, []string{
		"kernel/net/9p/9pnet.ko", "kernel/drivers/virtio/virtio_ring.ko", "kernel/net/9p/9pnet_virtio.ko",
		"kernel/fs/netfs/netfs.ko", "kernel/fs/9p/9p.ko.xz",
		"kernel/drivers/md/dm-mod.ko", "kernel/drivers/md/dm-crypt.ko",
	}, order)

	_, err = moduleLoadOrder(dir, []string{"no_such_module"})
	assert.ErrorIs(t, err, ErrUnavailable)
}

func TestVersionLessIsNumeric(t *testing.T) {
	assert.True(t, versionLess("6.1.0-9-amd64", "6.1.0-10-amd64"))
	assert.True(t, versionLess("6.9.0-1-amd64", "6.10.0-1-amd64"))
	assert.False(t, versionLess("6.10.0-1-amd64", "6.9.0-1-amd64"))
}

// The installed kernel unpacks into an ELF with a PVH entry point; this is
// what makes boots fast, so a kernel update that breaks it must show.
func TestInstalledKernelUnpacksForPVH(t *testing.T) {
	testenv.Root(t)
	k, err := FindKernel()
	if err != nil {
		testenv.Unavailable(t, err.Error())
	}
	testenv.Tools(t, "xz")
	f, err := unpackKernel(k.Image)
	require.NoError(t, err)
	defer f.Close()
	st, err := f.Stat()
	require.NoError(t, err)
	assert.Greater(t, st.Size(), int64(10<<20))

	_, err = bzImagePayload([]byte("not a kernel"))
	assert.Error(t, err)
}

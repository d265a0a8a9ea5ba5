package vhd

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

const mib = 1 << 20

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// pyvhdiRead reads [off, off+n) of the chain leaf→parents with libvhdi,
// an implementation independent of ours.
func pyvhdiRead(t *testing.T, chain []string, off, n int64) []byte {
	t.Helper()
	py := testenv.Tools(t, "python3")["python3"]
	if p, err := exec.LookPath("/usr/bin/python3"); err == nil {
		py = p // Debian's python3 has the python3-libvhdi module
	}
	script := `
import sys, pyvhdi
paths = sys.argv[3:]
files = []
for p in paths:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
leaf = files[0]
leaf.seek(int(sys.argv[1]))
sys.stdout.buffer.write(leaf.read(int(sys.argv[2])))
`
	args := append([]string{"-c", script, fmt.Sprint(off), fmt.Sprint(n)}, chain...)
	out, err := exec.Command(py, args...).Output()
	if ee, ok := err.(*exec.ExitError); ok && strings.Contains(string(ee.Stderr), "No module named 'pyvhdi'") {
		testenv.Unavailable(t, "python3-libvhdi is not installed")
	}
	require.NoError(t, err, "pyvhdi: %v", err)
	return out
}

func TestCreateIsReadByQemuImgAndLibvhdi(t *testing.T) {
	tools := testenv.Tools(t, "qemu-img", "vhdiinfo")
	dir := t.TempDir()
	p := filepath.Join(dir, "a.vhd")
	require.NoError(t, Create(p, 10*mib+1, CreateOptions{MaxSize: MaxSize}))

	out, err := exec.Command(tools["qemu-img"], "info", "--output=json", "-f", "vpc", p).Output()
	require.NoError(t, err)
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	require.NoError(t, json.Unmarshal(out, &info))
	assert.Equal(t, int64(12*mib), info.VirtualSize, "rounded up to whole 2 MiB blocks, like vhd-util")
	assert.Equal(t, "vpc", info.Format)

	out, err = exec.Command(tools["vhdiinfo"], p).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "Dynamic")

	img, err := Open(p, false)
	require.NoError(t, err)
	defer img.Close()
	inf := img.Info()
	assert.Equal(t, int64(1044480)*BlockSize, inf.MaxSize, "BAT preallocated for 2040 GiB")
	assert.Equal(t, TypeDynamic, inf.Type)
	st, _ := os.Stat(p)
	// footer + header + 4 MiB BAT + batmap header + 255-sector map + footer
	assert.Equal(t, int64(512+1024+1044480*4+512+255*512+512), st.Size())
}

func TestChainWrittenByUsIsReadByLibvhdi(t *testing.T) {
	testenv.Tools(t, "vhdiinfo")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhd")
	leaf := filepath.Join(dir, "leaf.vhd")
	require.NoError(t, Create(base, 8*mib, CreateOptions{MaxSize: 64 * mib}))

	img, err := Open(base, true)
	require.NoError(t, err)
	baseData := randomBytes(t, 3*mib)
	_, err = img.WriteAt(baseData, 1*mib) // spans blocks 0 and 1
	require.NoError(t, err)
	require.NoError(t, img.Close())

	require.NoError(t, Snapshot(leaf, base, CreateOptions{MaxSize: 64 * mib}))
	child, err := Open(leaf, true)
	require.NoError(t, err)
	leafData := randomBytes(t, 4096+512)
	_, err = child.WriteAt(leafData, 2*mib-512)
	require.NoError(t, err)
	require.NoError(t, child.Close())

	want := make([]byte, 8*mib)
	copy(want[1*mib:], baseData)
	copy(want[2*mib-512:], leafData)

	got := pyvhdiRead(t, []string{leaf, base}, 0, 8*mib)
	require.Equal(t, len(want), len(got))
	assert.True(t, bytes.Equal(want, got), "libvhdi reads what we wrote through the chain")

	c, err := OpenChain(leaf)
	require.NoError(t, err)
	defer c.Close()
	mine := make([]byte, 8*mib)
	_, err = c.ReadAt(mine, 0)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, mine), "our chain reader agrees")

	out, err := exec.Command("vhdiinfo", leaf).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "base.vhd", "parent filename visible to libvhdi")
}

func TestResizeGrowsWithinBATAndRefusesShrink(t *testing.T) {
	p := filepath.Join(t.TempDir(), "r.vhd")
	require.NoError(t, Create(p, 4*mib, CreateOptions{MaxSize: 16 * mib}))
	img, err := Open(p, true)
	require.NoError(t, err)
	defer img.Close()
	require.NoError(t, img.Resize(10*mib))
	require.ErrorIs(t, img.Resize(2*mib), ErrShrink)
	require.ErrorIs(t, img.Resize(32*mib), ErrTooLarge)
	img2, err := Open(p, false)
	require.NoError(t, err)
	defer img2.Close()
	assert.Equal(t, int64(10*mib), img2.VirtualSize())
}

func TestLostFooterIsRecovered(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f.vhd")
	require.NoError(t, Create(p, 4*mib, CreateOptions{}))
	img, err := Open(p, true)
	require.NoError(t, err)
	data := randomBytes(t, 4096)
	_, err = img.WriteAt(data, 0)
	require.NoError(t, err)
	require.NoError(t, img.Close())
	st, _ := os.Stat(p)
	require.NoError(t, os.Truncate(p, st.Size()-512)) // as if killed before the footer landed

	img, err = Open(p, true)
	require.NoError(t, err, "falls back to the footer copy at offset 0")
	got := make([]byte, 4096)
	_, err = img.ReadOwnAt(got, 0)
	require.NoError(t, err)
	assert.Equal(t, data, got)
	require.NoError(t, img.Close())
	st2, _ := os.Stat(p)
	assert.Equal(t, st.Size(), st2.Size(), "footer rewritten at the end")
}

func TestSetParentRelinks(t *testing.T) {
	dir := t.TempDir()
	a, b, c := filepath.Join(dir, "a.vhd"), filepath.Join(dir, "b.vhd"), filepath.Join(dir, "c.vhd")
	require.NoError(t, Create(a, 4*mib, CreateOptions{}))
	require.NoError(t, Snapshot(b, a, CreateOptions{}))
	require.NoError(t, Snapshot(c, b, CreateOptions{}))
	img, err := Open(c, true)
	require.NoError(t, err)
	require.NoError(t, img.SetParent(a))
	require.NoError(t, img.Close())
	img, err = Open(c, false)
	require.NoError(t, err)
	defer img.Close()
	pp, err := img.ParentPath()
	require.NoError(t, err)
	assert.Equal(t, a, pp)
	assert.Equal(t, "a.vhd", img.Info().ParentName)
	ch, err := OpenChain(c)
	require.NoError(t, err, "uuid of the new parent recorded")
	ch.Close()
}

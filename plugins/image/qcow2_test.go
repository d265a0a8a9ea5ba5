package image

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/testenv"
)

type qemuInfo struct {
	Format         string `json:"format"`
	VirtualSize    int64  `json:"virtual-size"`
	ClusterSize    int64  `json:"cluster-size"`
	BackingFile    string `json:"backing-filename"`
	FormatSpecific struct {
		Data struct {
			Compat string `json:"compat"`
		} `json:"data"`
	} `json:"format-specific"`
}

func info(t *testing.T, path string) qemuInfo {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "--output=json", path).Output()
	require.NoError(t, err)
	var i qemuInfo
	require.NoError(t, json.Unmarshal(out, &i))
	return i
}

// qemuIO runs qemu-io commands on an image (pattern writes and checked
// reads: qemu-io fails a `read -P` whose bytes differ).
func qemuIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.NotContains(t, string(out), "Pattern verification failed", "%s", out)
}

// Volumes above 2040 GiB are qcow2 (compat 1.1, 64 KiB clusters); their
// whole life cycle goes through qemu-img and is checked by qemu-img/qemu-io,
// independent readers.
func TestQCOW2Lifecycle(t *testing.T) {
	testenv.Tools(t, "qemu-img", "qemu-io")
	ctx := context.Background()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	x := Files{Runner: run.NewExec(log)}
	dir := t.TempDir()

	format, size, err := Choose(3 << 40)
	require.NoError(t, err)
	require.Equal(t, "qcow2", format)
	base := filepath.Join(dir, "base.qcow2")
	require.NoError(t, x.Create(ctx, base, size))
	i := info(t, base)
	assert.Equal(t, "qcow2", i.Format)
	assert.Equal(t, size, i.VirtualSize)
	assert.Equal(t, int64(64<<10), i.ClusterSize)
	assert.Equal(t, "1.1", i.FormatSpecific.Data.Compat)
	qemuIO(t, base, "write -P 0x41 0 64k")

	child := filepath.Join(dir, "child.qcow2")
	require.NoError(t, x.Snapshot(ctx, child, base))
	assert.Equal(t, "base.qcow2", info(t, child).BackingFile, "the child names its parent relative to itself")
	qemuIO(t, child, "write -P 0x42 64k 64k", "read -P 0x41 0 64k", "read -P 0x42 64k 64k")

	leaf := filepath.Join(dir, "leaf.qcow2")
	require.NoError(t, x.Snapshot(ctx, leaf, child))
	require.NoError(t, x.Coalesce(ctx, child, base))
	qemuIO(t, base, "read -P 0x41 0 64k", "read -P 0x42 64k 64k")
	require.NoError(t, x.Reparent(ctx, leaf, base))
	assert.Equal(t, "base.qcow2", info(t, leaf).BackingFile)
	qemuIO(t, leaf, "read -P 0x41 0 64k", "read -P 0x42 64k 64k")

	require.NoError(t, x.Resize(ctx, leaf, size+(1<<30)))
	assert.Equal(t, size+(1<<30), info(t, leaf).VirtualSize)
	assert.Error(t, x.Resize(ctx, leaf, size), "qemu-img refuses to shrink without --shrink")
	for _, p := range []string{base, leaf} {
		out, err := exec.Command("qemu-img", "check", "-f", "qcow2", p).CombinedOutput()
		assert.NoError(t, err, "%s", out)
	}
}

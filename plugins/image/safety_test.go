package image

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/testenv"
)

// Issue 13 item 10: a qcow2 resize to a size that is not a multiple of 512
// failed with Internal_error from qemu-img; the VHD path rounds up, and so
// does this one now.
func TestQCOW2ResizeRoundsUpToSector(t *testing.T) {
	testenv.Tools(t, "qemu-img")
	ctx := context.Background()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	x := Files{Runner: run.NewExec(log)}
	p := filepath.Join(t.TempDir(), "v.qcow2")
	require.NoError(t, x.Create(ctx, p, QCOW2Min))
	want := int64(QCOW2Min + 1<<20 + 512)
	require.NoError(t, x.Resize(ctx, p, QCOW2Min+1<<20+1))
	assert.Equal(t, want, info(t, p).VirtualSize)
	assert.Equal(t, want, RoundResize("qcow2", QCOW2Min+1<<20+1))
}

// Issue 13 item 16: images were 0644, readable by every dom0 user, though
// they are decrypted VM disks. Every image we create or snapshot is 0600.
func TestImagesAreRootOnly(t *testing.T) {
	testenv.Tools(t, "qemu-img")
	ctx := context.Background()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	x := Files{Runner: run.NewExec(log)}
	dir := t.TempDir()
	paths := map[string]string{}
	for _, f := range []string{"vhd", "qcow2"} {
		size := int64(4 << 20)
		if f == "qcow2" {
			size = QCOW2Min
		}
		base := filepath.Join(dir, "base."+f)
		require.NoError(t, x.Create(ctx, base, size))
		child := filepath.Join(dir, "child."+f)
		require.NoError(t, x.Snapshot(ctx, child, base))
		paths[base], paths[child] = f, f
	}
	for p := range paths {
		st, err := os.Stat(p)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), p)
	}
}

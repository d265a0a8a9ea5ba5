package fs

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
)

func TestMountedAtParsesMountinfo(t *testing.T) {
	dir := t.TempDir()
	mnt := filepath.Join(dir, "sr mount")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	esc := filepath.Join(dir, `sr\040mount`)
	info := filepath.Join(dir, "mountinfo")
	require.NoError(t, os.WriteFile(info, []byte(
		"22 1 0:21 / /proc rw,nosuid - proc proc rw\n"+
			"40 22 253:0 / "+esc+" rw,relatime shared:1 - ext4 /dev/mapper/luksext-1 rw\n"), 0o644))
	f := &FS{MountInfo: info}
	src, ok, err := f.MountedAt(mnt)
	require.NoError(t, err)
	assert.True(t, ok)
	assert.Equal(t, "/dev/mapper/luksext-1", src)
	_, ok, err = f.MountedAt(dir)
	require.NoError(t, err)
	assert.False(t, ok)
}

func TestFsckExitCodes(t *testing.T) {
	for code, want := range map[int]string{0: "", 1: "repaired", 4: "corrupt"} {
		r := runfake.New()
		r.Handle("e2fsck", func(c runfake.Call) (run.Result, error) {
			if code == 0 {
				return run.Result{}, nil
			}
			return run.Result{}, &run.CommandError{Path: "e2fsck", ExitCode: code}
		})
		repaired, err := (&FS{Run: r}).Fsck(context.Background(), "/dev/mapper/x")
		switch want {
		case "":
			assert.NoError(t, err)
			assert.False(t, repaired)
		case "repaired":
			assert.NoError(t, err)
			assert.True(t, repaired)
		case "corrupt":
			assert.ErrorIs(t, err, ErrCorrupt)
		}
		assert.Equal(t, "e2fsck -p /dev/mapper/x", r.Calls()[0].Line())
	}
}

func TestUnmountAbsentIsSuccess(t *testing.T) {
	dir := t.TempDir()
	info := filepath.Join(dir, "mountinfo")
	require.NoError(t, os.WriteFile(info, nil, 0o644))
	f := &FS{Run: runfake.New(), MountInfo: info}
	require.NoError(t, f.Unmount(context.Background(), filepath.Join(dir, "gone")))
	assert.Empty(t, f.Run.(*runfake.Runner).Calls())
}

func TestStatvfs(t *testing.T) {
	s, err := Statvfs(t.TempDir())
	require.NoError(t, err)
	assert.Greater(t, s.Total, int64(0))
	assert.LessOrEqual(t, s.Free, s.Total)
}

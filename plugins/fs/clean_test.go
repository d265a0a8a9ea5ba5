package fs

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/testenv"
)

// A clean ext4 is not handed to e2fsck (it would only say "clean"); any
// state in which e2fsck -p would act still is, and e2fsck agrees with
// the verdict each time.
func TestFsckSkipsOnlyACleanExt4(t *testing.T) {
	testenv.Tools(t, "mkfs.ext4", "debugfs", "e2fsck")
	img := filepath.Join(t.TempDir(), "fs.img")
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	require.NoError(t, os.Truncate(img, 16<<20))
	sh := func(args ...string) string {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		require.NoError(t, err, "%v: %s", args, out)
		return string(out)
	}
	sh("mkfs.ext4", "-F", "-q", img)
	fsck := func() (bool, int) {
		r := runfake.New()
		r.Handle("e2fsck", func(runfake.Call) (run.Result, error) { return run.Result{}, nil })
		_, err := (&FS{Run: r}).Fsck(context.Background(), img)
		require.NoError(t, err)
		clean, _ := cleanExt4(img, time.Now())
		return clean, len(r.Calls())
	}
	clean, calls := fsck()
	assert.True(t, clean)
	assert.Equal(t, 0, calls, "clean: no e2fsck exec")
	assert.Contains(t, sh("e2fsck", "-p", img), "clean")

	for _, c := range []struct{ name, debugfs string }{
		{"errors recorded", "ssv state 3"},
		{"not cleanly unmounted", "ssv state 0"},
		{"journal to replay", "feature needs_recovery"},
		{"orphans", "ssv last_orphan 12"},
		{"mount count", "ssv max_mnt_count 5"},
		{"check interval", "ssv checkinterval 60"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cp := img + ".case"
			b, err := os.ReadFile(img)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(cp, b, 0o600))
			sh("debugfs", "-w", "-R", c.debugfs, cp)
			if c.name == "mount count" {
				sh("debugfs", "-w", "-R", "ssv mnt_count 9", cp)
			}
			if c.name == "check interval" {
				sh("debugfs", "-w", "-R", "ssv lastcheck 20200101", cp)
			}
			clean, reason := cleanExt4(cp, time.Now())
			assert.False(t, clean)
			assert.NotEmpty(t, reason)
			r := runfake.New()
			r.Handle("e2fsck", func(runfake.Call) (run.Result, error) { return run.Result{}, nil })
			_, err = (&FS{Run: r}).Fsck(context.Background(), cp)
			require.NoError(t, err)
			assert.Len(t, r.Calls(), 1, "e2fsck runs")
		})
	}
}

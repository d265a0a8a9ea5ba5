package attachment

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
)

func (f *fixture) running(t *testing.T) int {
	t.Helper()
	ctx := context.Background()
	_, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	for n := range f.bt.Minors() {
		return n
	}
	t.Fatal("no minor")
	return -1
}

func TestPauseHoldsIOUntilResume(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	minor := f.running(t)
	q, err := f.m.Pause(ctx, f.img.Path)
	require.NoError(t, err)
	require.True(t, q.Paused())
	_, err = f.bt.Write(minor)
	require.ErrorIs(t, err, tapdiskfake.ErrPaused, "a paused tapdisk holds I/O")
	require.NoError(t, q.Resume(ctx))
	path, err := f.bt.Write(minor)
	require.NoError(t, err)
	assert.Equal(t, f.img.Path, path)
	assert.Contains(t, f.mutations(), "tap-ctl pause -p 1001 -m 0")
	assert.Contains(t, f.mutations(), "tap-ctl unpause -p 1001 -m 0")
	rec := f.record(t)
	assert.Nil(t, rec.Paused, "pause cleared from the record")
}

func (f *fixture) record(t *testing.T) *Record {
	t.Helper()
	v, err := f.m.lock(context.Background(), f.img, false)
	require.NoError(t, err)
	defer v.unlock()
	rec, err := v.load()
	require.NoError(t, err)
	return rec
}

func TestPauseOfAnUnusedVolumeDoesNothing(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	q, err := f.m.Pause(ctx, f.img.Path)
	require.NoError(t, err)
	require.False(t, q.Paused())
	require.NoError(t, q.Resume(ctx))
	_, err = f.m.Attach(ctx, f.img, "7") // attached, not activated: nothing open
	require.NoError(t, err)
	q, err = f.m.Pause(ctx, f.img.Path)
	require.NoError(t, err)
	require.False(t, q.Paused())
	require.NoError(t, q.Resume(ctx))
	assert.NotContains(t, f.mutations(), "tap-ctl pause -p 1001 -m 0")
}

// A tapdisk that does not answer pause: the call fails with
// ErrPauseFailed and the tapdisk runs on, unpaused.
func TestPauseTimeoutLeavesTheTapdiskRunning(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	minor := f.running(t)
	f.bt.HangPause(1001, true)
	_, err := f.m.Pause(ctx, f.img.Path)
	require.ErrorIs(t, err, ErrPauseFailed)
	assert.Contains(t, err.Error(), "nothing was changed and the VM keeps running")
	_, err = f.bt.Write(minor)
	require.NoError(t, err)
	assert.Nil(t, f.record(t).Paused)
	f.bt.HangPause(1001, false)
	require.NoError(t, f.m.Detach(ctx, f.img, "7"), "the lock was released")
}

// A caller killed between pause and unpause: the next Datapath call
// finishes the interrupted operation (Recover) and, if that leaves the
// tapdisk paused, unpauses it itself.
func TestDatapathCallUnpausesAfterACrashedPauser(t *testing.T) {
	for _, withRecover := range []bool{false, true} {
		f := newFixture(t)
		ctx := context.Background()
		dir := t.TempDir()
		f.img.Path = filepath.Join(dir, "0f4e.vhd")
		require.NoError(t, os.WriteFile(f.img.Path, nil, 0o600))
		minor := f.running(t)
		q, err := f.m.Pause(ctx, f.img.Path)
		require.NoError(t, err)
		q.v.unlock() // the pauser dies: its lock goes, the record stays
		_, err = f.bt.Write(minor)
		require.ErrorIs(t, err, tapdiskfake.ErrPaused)
		recovered := 0
		if withRecover {
			f.m.Recover = func(ctx context.Context, path string) error {
				recovered++
				q, err := f.m.Pause(ctx, path) // takes the paused tapdisk over
				if err != nil {
					return err
				}
				require.True(t, q.Paused())
				return q.Resume(ctx)
			}
		}
		require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
		_, err = f.bt.Write(minor)
		require.NoError(t, err, "unpaused")
		assert.Nil(t, f.record(t).Paused)
		if withRecover {
			assert.Equal(t, 1, recovered)
		}
	}
}

// If the image is not at its path (a snapshot interrupted between its
// renames), the Datapath call refuses to unpause blindly.
func TestStalePauseWithMissingImageIsNotUnpausedBlindly(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.img.Path = filepath.Join(t.TempDir(), "0f4e.vhd")
	minor := f.running(t)
	q, err := f.m.Pause(ctx, f.img.Path)
	require.NoError(t, err)
	q.v.unlock()
	err = f.m.Deactivate(ctx, f.img, "7")
	require.ErrorIs(t, err, ErrStalePause)
	_, err = f.bt.Write(minor)
	require.ErrorIs(t, err, tapdiskfake.ErrPaused)
}

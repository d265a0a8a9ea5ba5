package lock

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

func TestExclusiveExcludesAndSharedShares(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sr.lock")
	a, ok, err := TryAcquire(p, Shared)
	require.NoError(t, err)
	require.True(t, ok)
	b, ok, err := TryAcquire(p, Shared)
	require.NoError(t, err)
	require.True(t, ok, "two readers")
	_, ok, err = TryAcquire(p, Exclusive)
	require.NoError(t, err)
	assert.False(t, ok, "a writer waits for readers")

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = Acquire(ctx, p, Exclusive, nil)
	require.ErrorIs(t, err, ErrTimeout)

	require.NoError(t, a.Release())
	require.NoError(t, b.Release())
	w, err := Acquire(context.Background(), p, Exclusive, nil)
	require.NoError(t, err)
	held, err := Held(p, Shared)
	require.NoError(t, err)
	assert.True(t, held)
	require.NoError(t, w.Release())
	held, err = Held(p, Shared)
	require.NoError(t, err)
	assert.False(t, held)
}

// A lock held by a process killed with SIGKILL is free again.
func TestLockOfKilledProcessIsReleased(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sr.lock")
	f, err := os.Create(p)
	require.NoError(t, err)
	f.Close()
	flock := testenv.Tools(t, "flock")["flock"]
	cmd := exec.Command(flock, "--no-fork", "-x", p, "sleep", "60")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	require.Eventually(t, func() bool { h, _ := Held(p, Shared); return h }, 5*time.Second, 10*time.Millisecond)
	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := Acquire(ctx, p, Exclusive, nil)
	require.NoError(t, err)
	l.Release()
}

func TestHeldCreatesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "unmounted-sr")
	held, err := Held(filepath.Join(dir, ".luksext", "gc", "running.lock"), Exclusive)
	require.NoError(t, err)
	assert.False(t, held)
	_, err = os.Stat(dir)
	assert.True(t, os.IsNotExist(err), "Held created %s", dir)
}

// Issue 13 item 3: Acquire recreated the directories of a lock under an SR
// that SR.detach had just unmounted, and the call then wrote its volume
// unencrypted under the bare mountpoint. Acquiring creates no directory,
// and follows no symlink planted as the lock file.
func TestAcquireCreatesNoDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "unmounted-sr")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := Acquire(ctx, filepath.Join(dir, ".luksext", "locks", "sr.lock"), Exclusive, nil)
	require.Error(t, err)
	assert.ErrorIs(t, err, os.ErrNotExist)
	_, err = os.Stat(dir)
	assert.True(t, os.IsNotExist(err), "Acquire created %s", dir)

	target := filepath.Join(t.TempDir(), "victim")
	link := filepath.Join(t.TempDir(), "x.lock")
	require.NoError(t, os.Symlink(target, link))
	_, _, err = TryAcquire(link, Exclusive)
	assert.Error(t, err)
	_, err = os.Stat(target)
	assert.True(t, os.IsNotExist(err), "TryAcquire followed the symlink")
}

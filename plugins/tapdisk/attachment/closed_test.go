package attachment

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/tapdisk"
)

// The image has a record from before tapdisk opens it until after Closed
// ran for its last detach; RecordedImages sees it all that time.
func TestClosedRunsAfterTheCloseAndBeforeTheRecordGoes(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	names := func() []string {
		t.Helper()
		n, err := f.m.RecordedImages()
		require.NoError(t, err)
		return n
	}
	assert.Empty(t, names(), "no state directory yet")
	var calls int
	f.m.Closed = func(_ context.Context, img tapdisk.Image) error {
		calls++
		assert.Equal(t, f.img, img)
		assert.Empty(t, f.bt.Minors(), "the image is closed and its minor freed before Closed")
		assert.Equal(t, []string{"0f4e.vhd"}, names(), "the record is still there while Closed runs")
		return nil
	}
	_, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	assert.Equal(t, []string{"0f4e.vhd"}, names(), "recorded from the attach on (before any open)")
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	_, err = f.m.Attach(ctx, f.img, "8")
	require.NoError(t, err)
	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	assert.Zero(t, calls, "another domain still uses the image")
	require.NoError(t, f.m.Detach(ctx, f.img, "8"))
	assert.Equal(t, 1, calls)
	assert.Empty(t, names(), "record removed after Closed")
	f.requireClean(t)
}

// A failing Closed fails the detach and keeps the record (the image
// still counts as possibly changing); the rerun converges.
func TestClosedFailureKeepsTheRecord(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	fail := errors.New("SR metadata not writable")
	f.m.Closed = func(context.Context, tapdisk.Image) error { return fail }
	_, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	require.ErrorIs(t, f.m.Detach(ctx, f.img, "7"), fail)
	n, err := f.m.RecordedImages()
	require.NoError(t, err)
	assert.Equal(t, []string{"0f4e.vhd"}, n, "the record stays")
	got, err := f.m.InUseUnder("/var/run/sr-mount/sr1")
	require.NoError(t, err)
	assert.Empty(t, got, "though no domain uses it any more")
	calls := 0
	f.m.Closed = func(context.Context, tapdisk.Image) error { calls++; return nil }
	require.NoError(t, f.m.Detach(ctx, f.img, "7"), "the rerun (domain already gone) converges")
	assert.Equal(t, 1, calls, "and runs Closed again")
	n, err = f.m.RecordedImages()
	require.NoError(t, err)
	assert.Empty(t, n)
	f.requireClean(t)
}

func TestRecordedImagesNamesEvenDamagedRecords(t *testing.T) {
	f := newFixture(t)
	require.NoError(t, os.MkdirAll(f.m.Dir, 0o700))
	img := tapdisk.Image{Type: "qcow2", Path: "/var/run/sr-mount/sr1/a-b.qcow2"}
	require.NoError(t, os.WriteFile(filepath.Join(f.m.Dir, name(img)+".json"), []byte("{"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(f.m.Dir, name(img)+".lock"), nil, 0o600))
	n, err := f.m.RecordedImages()
	require.NoError(t, err)
	assert.Equal(t, []string{"a-b.qcow2"}, n, "named by the file, not its content; lock files are no records")
	require.NoError(t, os.WriteFile(filepath.Join(f.m.Dir, "junk.json"), nil, 0o600))
	_, err = f.m.RecordedImages()
	require.ErrorIs(t, err, ErrDamagedRecord, "a record named otherwise: the caller must assume any image may be open")
}

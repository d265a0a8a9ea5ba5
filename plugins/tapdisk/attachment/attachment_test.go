package attachment

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
)

type fixture struct {
	fake *runfake.Runner
	bt   *tapdiskfake.Blktap
	m    *Manager
	img  tapdisk.Image
}

func newFixture(t *testing.T) *fixture {
	f := runfake.New()
	bt := tapdiskfake.New(f)
	dir := filepath.Join(t.TempDir(), "datapath")
	log := logrus.New()
	log.SetOutput(io.Discard)
	return &fixture{fake: f, bt: bt, m: &Manager{Ctl: tapdisk.Ctl{Runner: f}, Dir: dir, Log: log},
		img: tapdisk.Image{Type: "vhd", Path: "/var/run/sr-mount/sr1/0f4e.vhd"}}
}

// mutations are the tap-ctl calls that change something (not list).
func (f *fixture) mutations() []string {
	var out []string
	for _, c := range f.fake.Calls() {
		if c.Args[0] != "list" {
			out = append(out, c.Line())
		}
	}
	return out
}

func (f *fixture) requireClean(t *testing.T) {
	t.Helper()
	assert.Empty(t, f.bt.Tapdisks(), "tapdisks left running")
	assert.Empty(t, f.bt.Minors(), "minors left allocated")
	entries, _ := os.ReadDir(f.m.Dir)
	for _, e := range entries {
		assert.True(t, strings.HasSuffix(e.Name(), ".lock"), "record left behind: %s", e.Name())
	}
}

func TestLifecycleCommandLines(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	dev, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	assert.Equal(t, "/dev/xen/blktap-2/tapdev0", dev)
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	assert.Equal(t, tapdiskfake.Minor{PID: 1001, Type: "vhd", Path: f.img.Path, Opens: 1}, f.bt.Minors()[0])
	require.NoError(t, f.m.Deactivate(ctx, f.img, "7"))
	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	assert.Equal(t, []string{
		"tap-ctl spawn",
		"tap-ctl allocate",
		"tap-ctl attach -p 1001 -m 0",
		"tap-ctl open -p 1001 -m 0 -a vhd:/var/run/sr-mount/sr1/0f4e.vhd",
		"tap-ctl close -p 1001 -m 0",
		"tap-ctl detach -p 1001 -m 0",
		"tap-ctl free -m 0",
	}, f.mutations())
	f.requireClean(t)
}

func TestEveryCallIsIdempotent(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		dev, err := f.m.Attach(ctx, f.img, "u0_vbd_0_xvdb")
		require.NoError(t, err)
		assert.Equal(t, "/dev/xen/blktap-2/tapdev0", dev)
	}
	for i := 0; i < 3; i++ {
		require.NoError(t, f.m.Activate(ctx, f.img, "u0_vbd_0_xvdb", true))
	}
	assert.True(t, f.bt.Minors()[0].ReadOnly, "activate_readonly opens with -R")
	for i := 0; i < 3; i++ {
		require.NoError(t, f.m.Deactivate(ctx, f.img, "u0_vbd_0_xvdb"))
	}
	for i := 0; i < 3; i++ {
		require.NoError(t, f.m.Detach(ctx, f.img, "u0_vbd_0_xvdb"))
	}
	assert.Equal(t, []string{
		"tap-ctl spawn",
		"tap-ctl allocate",
		"tap-ctl attach -p 1001 -m 0",
		"tap-ctl open -p 1001 -m 0 -a vhd:/var/run/sr-mount/sr1/0f4e.vhd -R",
		"tap-ctl close -p 1001 -m 0",
		"tap-ctl detach -p 1001 -m 0",
		"tap-ctl free -m 0",
	}, f.mutations())
	f.requireClean(t)
}

func TestTwoDomainsShareOneTapdisk(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	d7, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	d0, err := f.m.Attach(ctx, f.img, "u0_3f2a_11")
	require.NoError(t, err)
	assert.Equal(t, d7, d0, "the second domain reuses the tapdisk")
	require.NoError(t, f.m.Activate(ctx, f.img, "u0_3f2a_11", true), "read-only user of a read-write tapdisk")
	assert.Len(t, f.bt.Tapdisks(), 1)

	require.NoError(t, f.m.Deactivate(ctx, f.img, "7"))
	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	assert.Equal(t, f.img.Path, f.bt.Minors()[0].Path, "still open for the other domain")

	require.NoError(t, f.m.Detach(ctx, f.img, "u0_3f2a_11"), "detach deactivates first")
	assert.Equal(t, 1, strings.Count(strings.Join(f.mutations(), "\n"), "spawn"))
	assert.Equal(t, 1, strings.Count(strings.Join(f.mutations(), "\n"), "open"))
	f.requireClean(t)
}

func TestReadOnlyThenReadWrite(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for _, d := range []string{"7", "8"} {
		_, err := f.m.Attach(ctx, f.img, d)
		require.NoError(t, err)
	}
	require.NoError(t, f.m.Activate(ctx, f.img, "7", true))
	err := f.m.Activate(ctx, f.img, "8", false)
	require.ErrorIs(t, err, ErrInUse)
	assert.Contains(t, err.Error(), "7")
	// Alone, a read-only user may reopen read-write.
	require.NoError(t, f.m.Deactivate(ctx, f.img, "7"))
	require.NoError(t, f.m.Activate(ctx, f.img, "7", true))
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	assert.False(t, f.bt.Minors()[0].ReadOnly)
	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	require.NoError(t, f.m.Detach(ctx, f.img, "8"))
	f.requireClean(t)
}

func TestDetachOfNothingSucceedsAndTouchesNothing(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	require.NoError(t, f.m.Deactivate(ctx, f.img, "7"))
	assert.Empty(t, f.fake.Calls())
	_, err := os.Stat(f.m.Dir)
	assert.True(t, os.IsNotExist(err), "no state directory created")

	// With the directory present (another volume attached), still nothing.
	_, err = f.m.Attach(ctx, tapdisk.Image{Type: "vhd", Path: "/sr/other.vhd"}, "1")
	require.NoError(t, err)
	n := len(f.fake.Calls())
	require.NoError(t, f.m.Detach(ctx, f.img, "7"))
	assert.Len(t, f.fake.Calls(), n)
	// An unknown domain of an attached volume changes nothing either.
	require.NoError(t, f.m.Detach(ctx, tapdisk.Image{Type: "vhd", Path: "/sr/other.vhd"}, "99"))
	assert.Len(t, f.bt.Tapdisks(), 1)
}

func TestActivateNeedsAttach(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	require.ErrorIs(t, f.m.Activate(ctx, f.img, "7", false), ErrNotAttached)
	_, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	require.ErrorIs(t, f.m.Activate(ctx, f.img, "8", false), ErrNotAttached)
}

func TestCrashBetweenSpawnAndAttachConverges(t *testing.T) {
	for _, crash := range []tapdiskfake.Crash{
		{Command: "allocate"},              // spawned, recorded, then died
		{Command: "attach"},                // spawned and allocated, died before attach
		{Command: "attach", After: true},   // attached, died before recording it
		{Command: "open", After: true},     // opened, died before recording it
		{Command: "open"},                  // died before open, after the write-ahead
		{Command: "close", After: true},    // teardown interrupted at each step
		{Command: "detach", After: true},   //
		{Command: "free", After: true},     //
		{Command: "detach"},                //
		{Command: "spawn"},                 // nothing happened
		{Command: "allocate", After: true}, // a minor leaks (documented), the rerun still works
	} {
		t.Run(fmt.Sprintf("%s_after=%v", crash.Command, crash.After), func(t *testing.T) {
			f := newFixture(t)
			ctx := context.Background()
			f.bt.CrashOnce(crash)
			var firstErr error
			if _, err := f.m.Attach(ctx, f.img, "7"); err != nil {
				firstErr = err
				_, err = f.m.Attach(ctx, f.img, "7")
				require.NoError(t, err, "rerun of attach")
			}
			if err := f.m.Activate(ctx, f.img, "7", false); err != nil {
				firstErr = err
				require.NoError(t, f.m.Activate(ctx, f.img, "7", false), "rerun of activate")
			}
			require.Len(t, f.bt.Tapdisks(), 1)
			open := 0
			for _, mi := range f.bt.Minors() {
				if mi.Path != "" {
					open++
				}
			}
			require.Equal(t, 1, open, "exactly one open device")
			if err := f.m.Detach(ctx, f.img, "7"); err != nil {
				firstErr = err
				require.NoError(t, f.m.Detach(ctx, f.img, "7"), "rerun of detach")
			}
			require.Zero(t, f.bt.PendingCrashes(), "the crash was injected")
			if firstErr != nil {
				require.ErrorIs(t, firstErr, tapdiskfake.ErrCrash)
			} else {
				// A step that happened but was reported failed is seen
				// done by the re-list: teardown absorbs it.
				assert.Contains(t, []string{"close", "detach", "free"}, crash.Command)
			}
			assert.Empty(t, f.bt.Tapdisks())
			if crash.Command == "allocate" && crash.After {
				assert.Len(t, f.bt.Minors(), 1, "the unrecorded minor is the one known leak")
				return
			}
			f.requireClean(t)
		})
	}
}

func TestTapdiskDiedUnderneath(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	_, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
	f.bt.KillTapdisk(f.bt.Tapdisks()[0])
	require.ErrorIs(t, f.m.Activate(ctx, f.img, "7", false), ErrNotAttached)
	require.NoError(t, f.m.Deactivate(ctx, f.img, "7"))
	require.NoError(t, f.m.Detach(ctx, f.img, "7"), "detach never fails because something is gone")
	f.requireClean(t)
	// And the volume can be served again.
	_, err = f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	require.NoError(t, f.m.Activate(ctx, f.img, "7", false))
}

func TestEmptyDomainMeansTheOneGuest(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for _, d := range []string{"12", "u0_vbd_0_xvda"} {
		_, err := f.m.Attach(ctx, f.img, d)
		require.NoError(t, err)
		require.NoError(t, f.m.Activate(ctx, f.img, d, false))
	}
	require.NoError(t, f.m.Deactivate(ctx, f.img, ""))
	require.NoError(t, f.m.Detach(ctx, f.img, ""))
	require.NoError(t, f.m.Detach(ctx, f.img, "u0_vbd_0_xvda"))
	f.requireClean(t)

	// Two guests: "" is ambiguous and must not tear down either.
	for _, d := range []string{"12", "13"} {
		_, err := f.m.Attach(ctx, f.img, d)
		require.NoError(t, err)
	}
	require.NoError(t, f.m.Detach(ctx, f.img, ""))
	assert.Len(t, f.bt.Tapdisks(), 1)
}

func TestConcurrentAttachesSpawnOnce(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(d string) {
			defer wg.Done()
			if _, err := f.m.Attach(ctx, f.img, d); err != nil {
				errs <- err
				return
			}
			errs <- f.m.Activate(ctx, f.img, d, false)
		}(fmt.Sprint(i))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	assert.Len(t, f.bt.Tapdisks(), 1)
	assert.Equal(t, 1, strings.Count(strings.Join(f.mutations(), "\n"), "open"))
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(d string) { defer wg.Done(); errs2 := f.m.Detach(ctx, f.img, d); assert.NoError(t, errs2) }(fmt.Sprint(i))
	}
	wg.Wait()
	f.requireClean(t)
}

func TestDamagedRecord(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	_, err := f.m.Attach(ctx, f.img, "7")
	require.NoError(t, err)
	rec := filepath.Join(f.m.Dir, name(f.img)+".json")
	require.NoError(t, os.WriteFile(rec, []byte("{torn"), 0o600))
	err = f.m.Detach(ctx, f.img, "7")
	require.ErrorIs(t, err, ErrDamagedRecord)
	assert.Contains(t, err.Error(), "tap-ctl list")
}

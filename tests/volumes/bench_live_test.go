//go:build bench

package volumes

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/sr-types/luksext"
)

// pauseClock wraps tap-ctl to time how long each pause lasts (from
// tap-ctl pause starting to tap-ctl unpause returning).
type pauseClock struct {
	inner  run.Runner
	mu     sync.Mutex
	start  time.Time
	paused []time.Duration
}

func (p *pauseClock) Run(ctx context.Context, c run.Cmd) (run.Result, error) {
	now := time.Now()
	res, err := p.inner.Run(ctx, c)
	p.mu.Lock()
	defer p.mu.Unlock()
	switch c.Args[0] {
	case "pause":
		p.start = now
	case "unpause":
		p.paused = append(p.paused, time.Since(p.start))
	}
	return res, err
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// TestBenchLiveSnapshotPause measures how long Volume.snapshot of a running
// VM's disk keeps its tapdisk paused, next to the call's total time. The
// tapdisk is tapdiskfake (its pause and unpause cost nothing), so the
// pause figure is our own work inside the window: renames, two new VHDs,
// fsyncs, records.
func TestBenchLiveSnapshotPause(t *testing.T) {
	const n = 11
	s := newSR(t)
	clock := &pauseClock{inner: s.tapctl}
	s.dp.Ctl.Runner = clock
	a := s.create("A")
	m := s.start(a)
	var totals, snapPauses []time.Duration
	for i := 0; i < n; i++ {
		m.write(i)
		clock.mu.Lock()
		clock.paused = nil
		clock.mu.Unlock()
		start := time.Now()
		snap := s.snapshot("Volume.snapshot", a)
		totals = append(totals, time.Since(start))
		clock.mu.Lock()
		require.Len(t, clock.paused, 1, "one pause per live snapshot")
		snapPauses = append(snapPauses, clock.paused[0])
		clock.mu.Unlock()
		s.destroy(snap)
		require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	}
	fmt.Printf("BENCH live-snapshot VM paused (median of %d, 8 MiB VHD, fake tapdisk): %.1f ms of a %.1f ms Volume.snapshot (in process), ratio %.2f\n",
		n, ms(median(snapPauses)), ms(median(totals)), float64(median(snapPauses))/float64(median(totals)))
}

// TestBenchGCCoalesce measures the GC coalescing a 64 MiB chain (a hidden
// base holding 64 MiB of data into its parent), next to blktap's own
// vhd-util coalesce on a copy of the same two files.
func TestBenchGCCoalesce(t *testing.T) {
	const size = 64 * mib
	vhdUtil := filepath.Join(repoRootDir(), "..", "shared", "dom0", "blktap", "bin", "vhd-util")
	if _, err := os.Stat(vhdUtil); err != nil {
		testenv.Unavailable(t, "blktap's vhd-util is not at "+vhdUtil)
	}
	s := newSR(t)
	var v smapi.Volume
	s.call("Volume.create", &v, "name", "big", "description", "", "size", size, "sharable", false)
	a := v.Key
	fill := func() {
		img, err := vhd.Open(s.leaf(a), true)
		require.NoError(t, err)
		buf := make([]byte, vhd.BlockSize)
		for off := int64(0); off < size; off += vhd.BlockSize {
			_, _ = rand.Read(buf)
			_, err := img.WriteAt(buf, off)
			require.NoError(t, err)
		}
		require.NoError(t, img.Close())
	}
	fill()
	var s1, s2 smapi.Volume
	s.call("Volume.snapshot", &s1, "key", a)
	fill()
	s.call("Volume.snapshot", &s2, "key", a)
	s.call("Volume.destroy", nil, "key", s1.Key)
	s.call("Volume.destroy", nil, "key", s2.Key)
	chain := s.chain(a) // leaf, base2 (64 MiB), base1 (64 MiB)
	require.Len(t, chain, 3)

	// the reference: vhd-util coalesce of base2 into base1, on copies
	ref := t.TempDir()
	for _, f := range chain[1:] {
		out, err := exec.Command("cp", "--sparse=always", f, ref).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	start := time.Now()
	out, err := exec.Command(vhdUtil, "coalesce", "-n", filepath.Join(ref, filepath.Base(chain[1]))).CombinedOutput()
	refTime := time.Since(start)
	require.NoError(t, err, "vhd-util coalesce: %s", out)

	require.NoError(t, exec.Command("sync").Run())
	start = time.Now()
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	ours := time.Since(start)
	require.Len(t, s.chain(a), 1)
	mibs := func(d time.Duration) float64 { return float64(size) / float64(mib) / d.Seconds() }
	fmt.Printf("BENCH gc-coalesce 64 MiB chain: luksext GC %.0f MiB/s (%.0f ms, whole pass incl. fsync and leaf-coalesce), vhd-util coalesce %.0f MiB/s (%.0f ms), ratio %.2f\n",
		mibs(ours), ms(ours), mibs(refTime), ms(refTime), mibs(ours)/mibs(refTime))
}

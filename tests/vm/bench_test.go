//go:build bench

package vm

import (
	"context"
	"fmt"
	"os/exec"
	"testing"
	"time"
)

// TestBenchBootAndRun measures what every VM test pays: a boot (the
// unpacked PVH kernel against the compressed bzImage a plain -kernel boot
// would use) and the overhead of one Run (against bash on the host).
func TestBenchBootAndRun(t *testing.T) {
	boot := func(t *testing.T, pvh bool) (*Machine, time.Duration) {
		m, err := newMachine(Config{Disks: []int64{8 << 20}, TPM: true}, t.TempDir())
		if err != nil {
			t.Skip(err)
		}
		t.Cleanup(m.Close)
		if !pvh {
			m.pvh = nil
		}
		t0 := time.Now()
		if err := m.boot(context.Background()); err != nil {
			t.Fatal(err)
		}
		return m, time.Since(t0)
	}
	m, pvhBoot := boot(t, true)
	_, bzBoot := boot(t, false)
	fmt.Printf("BENCH vm-boot-seconds ours=%.1f bzImage=%.1f ratio=%.2f\n",
		pvhBoot.Seconds(), bzBoot.Seconds(), pvhBoot.Seconds()/bzBoot.Seconds())

	const n = 10
	t0 := time.Now()
	for i := 0; i < n; i++ {
		m.MustRun(t, "true")
	}
	perRun := time.Since(t0) / n
	t0 = time.Now()
	for i := 0; i < n; i++ {
		if err := exec.Command("bash", "-c", "true").Run(); err != nil {
			t.Fatal(err)
		}
	}
	host := time.Since(t0) / n
	fmt.Printf("BENCH vm-run-overhead-ms ours=%.0f host-bash=%.1f ratio=%.0f\n",
		float64(perRun.Microseconds())/1000, float64(host.Microseconds())/1000, float64(perRun)/float64(host))

	t0 = time.Now()
	if err := m.RebootContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("BENCH vm-reboot-seconds ours=%.1f boot=%.1f ratio=%.2f\n",
		time.Since(t0).Seconds(), pvhBoot.Seconds(), time.Since(t0).Seconds()/pvhBoot.Seconds())
}

package vm

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestSmoke(t *testing.T) {
	t0 := time.Now()
	m := Start(t, Config{Disks: []int64{8 << 20}, TPM: true})
	t.Logf("boot %v", time.Since(t0))
	for i := 0; i < 3; i++ {
		t1 := time.Now()
		out, rc := m.Run(t, "true")
		t.Logf("run %v %q %d", time.Since(t1), out, rc)
	}
	out, rc := m.Run(t, "uname -a; mount; ls -l /dev/disk/by-id /dev/tpm*; echo hi >&2; exit 3")
	t.Logf("%s %d", out, rc)
	b, _ := os.ReadFile(filepath.Join(m.dir, "console.log"))
	os.WriteFile("/tmp/console-full.txt", b, 0o644)
}

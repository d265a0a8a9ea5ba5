package luksext

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/testenv"
)

// StopGC stops the collector that holds the running lock even when the
// pid file still names the previous collector: a new collector takes the
// lock before it writes its pid (attach, detach at once, attach again,
// detach: seen in tests/e2e TestDom0Matrix, where the stale pid made
// SR.detach fail In_use after 35 s).
func TestStopGCSignalsTheLockHolderNotAStalePID(t *testing.T) {
	tools := testenv.Tools(t, "flock", "sh")
	st := store.New(t.TempDir())
	require.NoError(t, os.MkdirAll(st.Path("gc"), 0o700))
	// a previous collector's pid file: a process that has exited
	old := exec.Command(tools["sh"], "-c", "exit 0")
	require.NoError(t, old.Run())
	require.NoError(t, os.WriteFile(gcPIDFile(st), []byte(strconv.Itoa(old.Process.Pid)), 0o600))
	// the new collector: holds the lock now, writes its pid a moment later
	pidTmp := filepath.Join(st.Path("gc"), "pid.new")
	holder := exec.Command(tools["flock"], "-x", gcRunningLock(st), tools["sh"], "-c",
		`sleep 0.5; echo $$ >`+pidTmp+` && mv `+pidTmp+` `+gcPIDFile(st)+`; exec sleep 60`)
	require.NoError(t, holder.Start())
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	require.Eventually(t, func() bool { h, _ := lock.Held(gcRunningLock(st), lock.Shared); return h }, 10*time.Second, 10*time.Millisecond)

	start := time.Now()
	require.NoError(t, StopGC(st.SR, 3*time.Second))
	require.Less(t, time.Since(start), 3*time.Second, "stopped by SIGTERM once its pid was written, before the kill deadline")
	held, err := lock.Held(gcRunningLock(st), lock.Shared)
	require.NoError(t, err)
	require.False(t, held)
}

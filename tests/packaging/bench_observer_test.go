//go:build bench

package packaging

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

// TestBenchObserverZip measures what the appended __main__.py archive
// (packaging/runpyzip) costs: Plugin.Query executed directly with and
// without the archive (the default, no Observer: nothing should change),
// and through `python3 -m observer` (an Observer on smapi: Python's start
// plus the exec), as medians of interleaved runs; and, as the floor of any
// Go plugin, a static Go binary that reads stdin and prints the same reply.
func TestBenchObserverZip(t *testing.T) {
	python := testenv.Tools(t, "python3", "make")["python3"]
	dir := t.TempDir()
	out, err := exec.Command("make", "-C", repoRoot(t), "build", "BIN="+filepath.Join(dir, "bin")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	withZip, err := os.ReadFile(filepath.Join(dir, "bin", "volume"))
	require.NoError(t, err)
	i := bytes.LastIndex(withZip, []byte("PK\x03\x04"))
	require.Greater(t, i, 0)
	for name, b := range map[string][]byte{"zip": withZip, "plain": withZip[:i]} {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, name), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name, "volume"), b, 0o755))
		require.NoError(t, os.Symlink("volume", filepath.Join(dir, name, "Plugin.Query")))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "observer.py"), []byte(standInObserver), 0o644))
	echo := buildStaticEcho(t, dir, filepath.Join(dir, "zip", "Plugin.Query"))
	runs := map[string][]time.Duration{}
	call := func(name string, argv ...string) {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = append(os.Environ(), "PYTHONPATH="+dir, "LUKSEXT_LOG_LEVEL=warn")
		cmd.Stdin = bytes.NewReader([]byte(`{"dbg":"bench"}`))
		t0 := time.Now()
		require.NoError(t, cmd.Run())
		runs[name] = append(runs[name], time.Since(t0))
	}
	for r := 0; r < 60; r++ {
		call("plain", filepath.Join(dir, "plain", "Plugin.Query"), "--json")
		call("zip", filepath.Join(dir, "zip", "Plugin.Query"), "--json")
		call("echo", echo, "--json")
		if r%3 == 0 {
			call("observer", python, "-m", "observer", filepath.Join(dir, "zip", "Plugin.Query"), "--json")
		}
	}
	med := func(d []time.Duration) float64 {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	p, z, o, e := med(runs["plain"]), med(runs["zip"]), med(runs["observer"]), med(runs["echo"])
	fmt.Printf("BENCH plugin-exec-ms ours-with-zip=%.1f plain-elf=%.1f ratio=%.2f\n", z, p, z/p)
	fmt.Printf("BENCH Plugin.Query exec vs a bare static Go JSON echo (median of 60): luksext %.1f ms, static Go echo %.1f ms, ratio %.2f\n", z, e, z/e)
	fmt.Printf("BENCH plugin-observer-ms ours-via-observer=%.1f direct=%.1f ratio=%.1f\n", o, z, o/z)
}

// buildStaticEcho builds the floor of a Go plugin's call: a static,
// stripped Go binary (built as `make build` builds ours) that reads all of
// stdin and prints a constant, the reply that the Plugin.Query at query
// gives.
func buildStaticEcho(t *testing.T, dir, query string) string {
	cmd := exec.Command(query, "--json")
	cmd.Stdin = bytes.NewReader([]byte(`{"dbg":"bench"}`))
	reply, err := cmd.Output()
	require.NoError(t, err)
	src := filepath.Join(dir, "echo")
	require.NoError(t, os.MkdirAll(src, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(src, "go.mod"), []byte("module echo\n\ngo 1.22\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(src, "main.go"), []byte(fmt.Sprintf(`package main

import (
	"io"
	"os"
)

const reply = %q

func main() {
	_, _ = io.ReadAll(os.Stdin)
	_, _ = os.Stdout.WriteString(reply)
}
`, reply)), 0o644))
	bin := filepath.Join(dir, "static-echo")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOWORK=off")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "%s", out)
	return bin
}

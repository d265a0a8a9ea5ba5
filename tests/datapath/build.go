// Package datapath tests the luksext datapath plugin against the fake
// tap-ctl (tests/fakes/tapctl): on the host with the fake's "none" backend
// (no root, no nbd), and in a VM where the fake's tapdisk serves images as
// real /dev/nbdN block devices (VHD chains itself, qcow2 through a private
// qemu-nbd, raw directly). Its helpers are exported so end-to-end
// tests (an SR on LUKS, then a VM disk on it) can install the same pieces
// in their own guests.
package datapath

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// RepoRoot is the module root, found from this file's location.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the source tree")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Binaries are the built datapath plugin and fake tap-ctl.
type Binaries struct {
	// PluginDir holds the datapath binary and one symlink per method, as
	// installed under /usr/libexec/xapi-storage-script/datapath/luksext.
	PluginDir string
	// TapCtl is the fake tap-ctl.
	TapCtl string
}

// Build compiles the datapath plugin and the fake tap-ctl (static, so
// they run unchanged in a guest) into dir.
func Build(t testing.TB, dir string) Binaries {
	t.Helper()
	b := Binaries{PluginDir: filepath.Join(dir, "plugin"), TapCtl: filepath.Join(dir, "tap-ctl")}
	plugin := filepath.Join(b.PluginDir, "datapath")
	for _, c := range [][2]string{{plugin, "./datapath"}, {b.TapCtl, "./tests/fakes/tapctl"}} {
		cmd := exec.Command("go", "build", "-trimpath", "-o", c[0], c[1])
		cmd.Dir = RepoRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "PATH="+os.Getenv("PATH")+":/usr/local/go/bin")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", c[1], err, out)
		}
	}
	out, err := exec.Command(plugin, "--list-methods").Output()
	if err != nil {
		t.Fatalf("%s --list-methods: %v", plugin, err)
	}
	for _, m := range strings.Fields(string(out)) {
		if err := os.Symlink("datapath", filepath.Join(b.PluginDir, m)); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

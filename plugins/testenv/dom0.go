package testenv

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Dom0Dir is ../shared/dom0 next to the repository: XCP-ng 8.3 dom0's tool
// versions (cryptsetup 1.7.4 and 2.0.3, util-linux 2.23.2, blktap, e2fsprogs
// 1.47.0's mke2fs.conf), built from their release tags; its README says why
// each version.
func Dom0Dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", "..", "shared", "dom0"))
}

// Dom0Tree copies the dom0 tool tree name (e.g. "cryptsetup-1.7.4") into
// dir and returns the copy's path. The copy is what runs: the shared tree
// may hold its library symlinks as small text files naming their target
// (a copy that did not keep symlinks), which the loader refuses; they are
// turned back into symlinks here, so RUNPATH $ORIGIN/../lib finds the
// version's own libcryptsetup/libblkid and not the host's. dir must be
// visible wherever the tool runs (a VM test's WorkDir). It skips (or fails
// under LUKSEXT_REQUIRE_ALL=1) when the tree is absent.
func Dom0Tree(t testing.TB, name, dir string) string {
	t.Helper()
	src := filepath.Join(Dom0Dir(), name)
	if _, err := os.Stat(src); err != nil {
		Unavailable(t, fmt.Sprintf("dom0 tool tree %s is missing (%v)", src, err))
	}
	dst := filepath.Join(dir, "dom0-"+name)
	if err := copyDom0Tree(src, dst); err != nil {
		t.Fatalf("copying %s: %v", src, err)
	}
	return dst
}

func copyDom0Tree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		out := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(out, 0o755)
		}
		if d.Type()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			_ = os.Remove(out)
			return os.Symlink(target, out)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		// A symlink stored as its target's name: "libfoo.so.1.2.3".
		if len(b) < 128 && !strings.ContainsAny(string(b), "/\n\x00") && strings.HasPrefix(string(b), "lib") {
			if _, err := os.Stat(filepath.Join(filepath.Dir(p), string(b))); err == nil {
				_ = os.Remove(out)
				return os.Symlink(string(b), out)
			}
		}
		_ = os.Remove(out)
		return os.WriteFile(out, b, 0o755)
	})
}

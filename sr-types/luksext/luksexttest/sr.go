// Package luksexttest makes directories that pass luksext.SRCheck without
// root: the tests of the volume layer run on plain directories.
package luksexttest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/sr-types/luksext"
)

// Root is a mount root (the test's /var/run/sr-mount) with its own mount
// table: a file in the kernel's /proc/self/mountinfo format, read by the
// same parser as the real one. What differs from the real thing is only
// that no filesystem is mounted, so "unmounting" an SR leaves its
// directory and files in place, as a bare mountpoint would be after umount
// if something had written under it.
type Root struct {
	Check luksext.SRCheck
	mu    sync.Mutex
	mnt   map[string]string // path -> source
}

// NewRoot makes an empty mount root.
func NewRoot(t testing.TB) *Root {
	t.Helper()
	dir := t.TempDir()
	r := &Root{Check: luksext.SRCheck{
		MountRoot: filepath.Join(dir, "sr-mount"),
		StateDir:  filepath.Join(dir, "state"),
		MountInfo: filepath.Join(dir, "mountinfo"),
		MapperDir: "/dev/mapper",
	}, mnt: map[string]string{}}
	if err := os.MkdirAll(r.Check.MountRoot, 0o700); err != nil {
		t.Fatal(err)
	}
	r.write(t)
	return r
}

// SR is an attached SR under a Root.
type SR struct {
	UUID, Path string
	root       *Root
}

// NewSR makes <root>/<uuid> with the SR record and lists it as mounted
// from /dev/mapper/luksext-<uuid>.
func (r *Root) NewSR(t testing.TB) *SR {
	t.Helper()
	u := store.NewID()
	s := &SR{UUID: u, Path: filepath.Join(r.Check.MountRoot, u), root: r}
	if err := os.MkdirAll(s.Path, 0o700); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(map[string]any{"schema": 1, "uuid": u, "name": "test SR", "description": ""})
	if err := os.WriteFile(filepath.Join(s.Path, luksext.SRMetaFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s.Mount(t, "/dev/mapper/luksext-"+u)
	return s
}

// NewSR is NewRoot(t).NewSR(t).
func NewSR(t testing.TB) *SR { return NewRoot(t).NewSR(t) }

// Check is the SRCheck that accepts s.
func (s *SR) Check() luksext.SRCheck { return s.root.Check }

// Mount lists the SR as mounted from source.
func (s *SR) Mount(t testing.TB, source string) {
	s.root.mu.Lock()
	s.root.mnt[s.Path] = source
	s.root.mu.Unlock()
	s.root.write(t)
}

// Unmount drops the SR from the mount table.
func (s *SR) Unmount(t testing.TB) {
	s.root.mu.Lock()
	delete(s.root.mnt, s.Path)
	s.root.mu.Unlock()
	s.root.write(t)
}

func (r *Root) write(t testing.TB) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var paths []string
	for p := range r.mnt {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	var b strings.Builder
	b.WriteString("25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
	for i, p := range paths {
		fmt.Fprintf(&b, "%d 25 254:%d / %s rw,relatime shared:%d - ext4 %s rw\n", 100+i, i, p, 80+i, r.mnt[p])
	}
	tmp := r.Check.MountInfo + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, r.Check.MountInfo); err != nil {
		t.Fatal(err)
	}
}

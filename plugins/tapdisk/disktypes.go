package tapdisk

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Which image formats can this host's tapdisk open?
//
// Neither tap-ctl nor tapdisk has a command that lists the disk types
// (xapi-project/blktap control/tap-ctl.c; tapdisk only learns a type when
// `tap-ctl open -a TYPE:PATH` reaches drivers/tapdisk-disktype.c
// tapdisk_disktype_find, which answers -ENOENT for an unknown name). The
// answer is compiled into tapdisk itself: the tapdisk_disk_types[] table
// of drivers/tapdisk-disktype.c, whose entries' names are NUL-terminated
// string constants in the binary. Upstream blktap (3.55.5, XCP-ng 8.3's
// base) names its qcow entry "qcow" and leaves its driver out (#if 0);
// XCP-ng's qcow2 builds (xcp-ng/blktap) rename the entry "qcow2" ("QEMU
// copy-on-write disk (qcow2)") and link the driver. So the name "qcow2" as
// a string of its own in the tapdisk that tap-ctl spawns (TAPDISK_EXECDIR/
// tapdisk, control/tap-ctl-spawn.c), or in a blktap library it links, is
// what tells the two builds apart; it reads the very binary that would
// open the image, on every host, without starting anything.

// TapdiskPaths are where blktap installs tapdisk (TAPDISK_EXECDIR: /usr/bin
// on XCP-ng 8.3, /usr/sbin or /usr/libexec on other builds).
var TapdiskPaths = []string{"/usr/bin/tapdisk", "/usr/sbin/tapdisk", "/usr/libexec/tapdisk", "/usr/local/bin/tapdisk"}

// libDirs are searched for the shared libraries tapdisk links (a meson
// build may put the disk type table in libblktap/libtapdisk).
var libDirs = []string{"/usr/lib64", "/lib64", "/usr/lib", "/lib", "/usr/lib/x86_64-linux-gnu"}

// ErrNoTapdisk: no tapdisk binary on this host.
var ErrNoTapdisk = errors.New("tapdisk is not installed")

// ErrDiskTypeUnsupported: tapdisk has no driver for the disk type.
var ErrDiskTypeUnsupported = errors.New("no driver for this disk type")

// SupportsDiskType reports whether the tapdisk at one of paths (the first
// that exists) has a disk type named name. It returns ErrNoTapdisk when
// none exists, and ErrDiskTypeUnsupported (naming the binary) when the
// type is missing.
func SupportsDiskType(paths []string, name string) error {
	var bin string
	for _, p := range paths {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			bin = p
			break
		}
	}
	if bin == "" {
		return fmt.Errorf("looked for %s: %w", strings.Join(paths, ", "), ErrNoTapdisk)
	}
	files := []string{bin}
	if f, err := elf.Open(bin); err == nil {
		libs, _ := f.ImportedLibraries()
		f.Close()
		for _, l := range libs {
			// Only blktap's own libraries can hold the table.
			if !strings.Contains(l, "tap") && !strings.Contains(l, "vhd") {
				continue
			}
			for _, d := range libDirs {
				if p := filepath.Join(d, l); fileExists(p) {
					files = append(files, p)
					break
				}
			}
		}
	}
	needle := append(append([]byte{0}, name...), 0)
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("reading %s: %w", p, err)
		}
		if bytes.Contains(b, needle) {
			return nil
		}
	}
	return fmt.Errorf("%s has no %q disk type (blktap built without its driver): %w", bin, name, ErrDiskTypeUnsupported)
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

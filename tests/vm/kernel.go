package vm

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Kernel is a bootable kernel image and its module tree.
type Kernel struct {
	Version    string // e.g. 6.1.0-56-amd64
	Image      string // /boot/vmlinuz-<Version>
	ModulesDir string // /lib/modules/<Version>
}

// FindKernel picks the newest /boot/vmlinuz-* that has a module tree. The
// guest loads modules from the host's /lib/modules over 9p, so a kernel
// without its modules.dep cannot run the VM tier.
func FindKernel() (Kernel, error) {
	images, _ := filepath.Glob("/boot/vmlinuz-*")
	var found []Kernel
	for _, img := range images {
		ver := strings.TrimPrefix(filepath.Base(img), "vmlinuz-")
		mods := filepath.Join("/lib/modules", ver)
		if _, err := os.Stat(filepath.Join(mods, "modules.dep")); err != nil {
			continue
		}
		found = append(found, Kernel{Version: ver, Image: img, ModulesDir: mods})
	}
	if len(found) == 0 {
		return Kernel{}, fmt.Errorf("%w: no /boot/vmlinuz-* with a matching /lib/modules/<version>/modules.dep (install linux-image-amd64)", ErrUnavailable)
	}
	sort.Slice(found, func(i, j int) bool { return versionLess(found[i].Version, found[j].Version) })
	k := found[len(found)-1]
	f, err := os.Open(k.Image)
	if err != nil {
		return Kernel{}, fmt.Errorf("%w: cannot read kernel image %s (run as root): %v", ErrUnavailable, k.Image, err)
	}
	f.Close()
	return k, nil
}

// versionLess compares dotted/dashed versions numerically where it can, so
// 6.10 sorts after 6.9.
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		if pa[i] == pb[i] {
			continue
		}
		var na, nb int
		_, ea := fmt.Sscanf(pa[i], "%d", &na)
		_, eb := fmt.Sscanf(pb[i], "%d", &nb)
		if ea == nil && eb == nil && na != nb {
			return na < nb
		}
		return pa[i] < pb[i]
	}
	return len(pa) < len(pb)
}

package luksext

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/smapi"
)

// SR layouts: what sits on the LUKS mapping. The layout is recorded in the
// disk's luksext metadata (luks.Metadata.Layout) and in the SR record, and
// SR.attach follows the record; it never probes the mapping for it.
const (
	// LayoutDirect: ext4 directly on the mapping (SR.create).
	LayoutDirect = ""
	// LayoutLVM: an SR adopted from SMAPIv1's ext type (luksext adopt):
	// volume group XSLocalEXT-<sr uuid> on the mapping, ext4 on its one
	// logical volume <sr uuid> (xcp-ng/sm drivers/EXTSR.py, lvutil.py).
	LayoutLVM = "lvm"
)

// LVMOps is the LVM2 the lvm layout needs (plugins/lvm.LVM).
type LVMOps interface {
	PVs(ctx context.Context) ([]lvm.PV, error)
	LVs(ctx context.Context, vg string) ([]lvm.LV, error)
	Activate(ctx context.Context, vg string) error
	Deactivate(ctx context.Context, vg string) error
}

// VGName is the volume group SMAPIv1's EXTSR makes for an SR.
func VGName(srUUID string) string { return "XSLocalEXT-" + srUUID }

// checkLayout refuses a layout this version does not know (a disk
// adopted or created by a newer luksext).
func checkLayout(layout, srUUID string) error {
	if layout != LayoutDirect && layout != LayoutLVM {
		return smapi.Errorf(smapi.KindNeedsAttention, "SR %s records layout %q, which this luksext version does not know (was it made by a newer one?)", srUUID, layout)
	}
	return nil
}

// lvmOps returns the LVM edge, or an error naming the missing tool.
func (s *srService) lvmOps() (LVMOps, error) {
	if s.LVM == nil {
		return nil, smapi.Errorf(smapi.KindToolMissing, "this SR is on LVM (adopted from SMAPIv1) but luksext was built without LVM support here; install lvm2")
	}
	return s.LVM, nil
}

// filesystemDevice returns the block device holding the SR's ext4 for its
// recorded layout, once the mapping is open: the mapping itself, or (lvm)
// the logical volume, whose group is activated first after proving its
// only physical volume is this SR's mapping (a group of the same name on
// another disk is never activated in its place).
func (s *srService) filesystemDevice(ctx context.Context, srUUID, layout string) (string, error) {
	mapper := s.LUKS.MapperPath(luks.SRName(srUUID))
	if layout == LayoutDirect {
		return mapper, nil
	}
	l, err := s.lvmOps()
	if err != nil {
		return "", err
	}
	vg := VGName(srUUID)
	if err := s.checkVGOn(ctx, l, vg, mapper); err != nil {
		return "", err
	}
	if err := l.Activate(ctx, vg); err != nil {
		return "", fmt.Errorf("activating the volume group %s of SR %s: %w", vg, srUUID, err)
	}
	lvs, err := l.LVs(ctx, vg)
	if err != nil {
		return "", err
	}
	for _, lv := range lvs {
		if lv.Name == srUUID {
			return lvm.DevPath(s.DevDir, vg, srUUID), nil
		}
	}
	return "", smapi.Errorf(smapi.KindNeedsAttention, "the volume group %s of SR %s has no logical volume %s", vg, srUUID, srUUID)
}

// checkVGOn proves vg's physical volumes are exactly the mapping.
func (s *srService) checkVGOn(ctx context.Context, l LVMOps, vg, mapper string) error {
	pvs, err := l.PVs(ctx)
	if err != nil {
		return err
	}
	var on []string
	ours := false
	for _, pv := range pvs {
		if pv.VG != vg {
			continue
		}
		on = append(on, pv.Name)
		ours = ours || pv.Name == mapper || sameBlockDevice(pv.Name, mapper)
	}
	switch {
	case len(on) == 0:
		return smapi.Errorf(smapi.KindNeedsAttention, "no volume group %s on %s (lvm pvs)", vg, mapper)
	case len(on) > 1 || !ours:
		return smapi.Errorf(smapi.KindNeedsAttention, "the volume group %s is on %s, not only on the SR's mapping %s; refusing to use it", vg, strings.Join(on, ", "), mapper)
	}
	return nil
}

// releaseLayout deactivates the SR's volume group (lvm layout) so that
// the mapping can close; nothing to do for the direct layout.
func (s *srService) releaseLayout(ctx context.Context, srUUID, layout string) error {
	if layout != LayoutLVM {
		return nil
	}
	l, err := s.lvmOps()
	if err != nil {
		return err
	}
	if err := l.Deactivate(ctx, VGName(srUUID)); err != nil {
		return smapi.Wrap(smapi.KindInUse, fmt.Errorf("deactivating the volume group %s: %w (is its logical volume still mounted or open? dmsetup info)", VGName(srUUID), err))
	}
	return nil
}

// openLayout is the recorded layout of the SR whose mapping is open: read
// from the luksext metadata of the disk under the mapping (sysfs slaves),
// so that a detach cut short after the unmount still deactivates the
// group. An unopened mapping has nothing on it to release.
func (s *srService) openLayout(srUUID string) (string, error) {
	name := luks.SRName(srUUID)
	if !s.LUKS.IsOpen(name) {
		return LayoutDirect, nil
	}
	dev, err := slaveOf(s.LUKS.MapperPath(name), s.sysDir(), s.DevDir)
	if err != nil {
		return "", fmt.Errorf("finding the disk under %s: %w", name, err)
	}
	md, ok, err := s.LUKS.ReadMetadata(dev)
	if err != nil {
		return "", err
	}
	if !ok {
		return LayoutDirect, nil
	}
	return md.Layout, checkLayout(md.Layout, srUUID)
}

// slaveOf is the one block device under the dm device at path
// (/sys/dev/block/<maj:min>/slaves/<name>), as devDir/<name>.
func slaveOf(path, sys, devDir string) (string, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return "", err
	}
	dir := filepath.Join(sys, "dev", "block", fmt.Sprintf("%d:%d", unixMajor(st.Rdev), unixMinor(st.Rdev)), "slaves")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	if len(entries) != 1 {
		return "", fmt.Errorf("%s has %d devices under it, want 1", path, len(entries))
	}
	return filepath.Join(devDir, entries[0].Name()), nil
}

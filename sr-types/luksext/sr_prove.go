package luksext

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// proveDisk refuses to let SR.destroy erase dev unless dev is this SR's
// disk by every account we can read: its LUKS header names the SR (luksext
// metadata or label luksext-<uuid>) and carries the LUKS UUID the SR
// record stores, and it is the device under the open mapping
// luksext-<uuid> (sysfs slaves of the dm device). A luksext-sr.json that
// names some other disk never gets that disk erased.
func (s *srService) proveDisk(dev, srUUID, luksUUID string) error {
	refuse := func(why string, a ...any) error {
		return smapi.Errorf(smapi.KindNeedsAttention, "refusing to erase %s for SR %s: %s", dev, srUUID, fmt.Sprintf(why, a...))
	}
	info, err := s.LUKS.Inspect(dev)
	if err != nil {
		return refuse("its LUKS header cannot be read (%v)", err)
	}
	if got := info.SRUUID(); got != srUUID {
		return refuse("its LUKS header belongs to SR %q", got)
	}
	if luksUUID == "" || !strings.EqualFold(info.UUID, luksUUID) {
		return refuse("its LUKS UUID is %s but the SR record says %q", info.UUID, luksUUID)
	}
	mapper := s.LUKS.MapperPath(luks.SRName(srUUID))
	ok, err := backs(dev, mapper, s.sysDir())
	if err != nil {
		return refuse("cannot tell which disk %s is on (%v)", mapper, err)
	}
	if !ok {
		return refuse("the open mapping %s is not on it", mapper)
	}
	return nil
}

func (s *srService) sysDir() string {
	if s.SysDir != "" {
		return s.SysDir
	}
	return "/sys"
}

// backs reports whether the block device dev is a slave of the dm device
// mapper (/sys/dev/block/<maj:min>/slaves/<name>/dev).
func backs(dev, mapper, sys string) (bool, error) {
	var d, m syscall.Stat_t
	if err := syscall.Stat(dev, &d); err != nil {
		return false, err
	}
	if err := syscall.Stat(mapper, &m); err != nil {
		return false, err
	}
	if d.Mode&syscall.S_IFMT != syscall.S_IFBLK || m.Mode&syscall.S_IFMT != syscall.S_IFBLK {
		return false, fmt.Errorf("%s or %s is not a block device", dev, mapper)
	}
	want := fmt.Sprintf("%d:%d", unixMajor(d.Rdev), unixMinor(d.Rdev))
	slaves := filepath.Join(sys, "dev", "block", fmt.Sprintf("%d:%d", unixMajor(m.Rdev), unixMinor(m.Rdev)), "slaves")
	entries, err := os.ReadDir(slaves)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(slaves, e.Name(), "dev"))
		if err == nil && strings.TrimSpace(string(b)) == want {
			return true, nil
		}
	}
	return false, nil
}

// Linux's dev_t encoding (glibc sysmacros.h).
func unixMajor(d uint64) uint64 { return (d>>8)&0xfff | (d>>32)&^0xfff }
func unixMinor(d uint64) uint64 { return d&0xff | (d>>12)&^0xff }

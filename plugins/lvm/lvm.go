// Package lvm is the little of LVM2 luksext needs for SRs adopted from
// SMAPIv1's `ext` type, whose filesystem sits on one logical volume
// (xcp-ng/sm drivers/EXTSR.py: `vgcreate --metadatasize 10M
// XSLocalEXT-<sr uuid> <dev>`, `lvcreate -n <sr uuid> -l 100%VG`): which
// volume group a device holds, its logical volumes and whether one is
// open, and activating or deactivating exactly that group. Everything
// runs `lvm <command>` through run.Runner, so the logic is tested without
// root; the real tool runs in the VM tier.
package lvm

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/luksext/luksext/plugins/run"
)

// ErrNoVG: the device holds no LVM physical volume, or one in no group.
var ErrNoVG = errors.New("no LVM volume group on the device")

// LVM runs the lvm tool.
type LVM struct {
	Run run.Runner
}

// LV is one logical volume as lvs reports it.
type LV struct {
	Name string
	// Active: the device-mapper device exists (lv_attr[4] == 'a').
	Active bool
	// Open: something holds it open, a mount or a process (lv_attr[5] == 'o').
	Open bool
}

// env keeps lvm quiet about descriptors the caller inherited (it warns on
// stderr for each) and makes it print plain numbers.
var env = []string{"LVM_SUPPRESS_FD_WARNINGS=1"}

func (l LVM) lvm(ctx context.Context, args ...string) (string, error) {
	res, err := l.Run.Run(ctx, run.Cmd{Tool: "lvm", Args: args, Env: env, Timeout: 2 * time.Minute})
	if err != nil {
		return "", fmt.Errorf("lvm %s: %w", strings.Join(args, " "), err)
	}
	return string(res.Stdout), nil
}

// PV is a physical volume and its group.
type PV struct {
	Name, VG string
}

// PVs lists every physical volume lvm sees, with its group ("" for none),
// once udev has processed the devices that just appeared (a mapping
// opened a moment ago: lvm finds devices through udev's database).
func (l LVM) PVs(ctx context.Context) ([]PV, error) {
	// best effort: without udev (a minimal system) lvm scans /dev itself
	_, _ = l.Run.Run(ctx, run.Cmd{Tool: "udevadm", Args: []string{"settle", "--timeout=10"}, Timeout: 15 * time.Second})
	out, err := l.lvm(ctx, "pvs", "--noheadings", "--separator", "|", "-o", "pv_name,vg_name")
	if err != nil {
		return nil, err
	}
	var pvs []PV
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		name, vg, ok := strings.Cut(line, "|")
		if !ok {
			return nil, fmt.Errorf("unexpected line from lvm pvs: %q", line)
		}
		pvs = append(pvs, PV{Name: strings.TrimSpace(name), VG: strings.TrimSpace(vg)})
	}
	return pvs, nil
}

// LVs lists the logical volumes of vg.
func (l LVM) LVs(ctx context.Context, vg string) ([]LV, error) {
	out, err := l.lvm(ctx, "lvs", "--noheadings", "--separator", "|", "-o", "lv_name,lv_attr", vg)
	if err != nil {
		return nil, err
	}
	var lvs []LV
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		name, attr, ok := strings.Cut(line, "|")
		attr = strings.TrimSpace(attr)
		if !ok || len(attr) < 6 {
			return nil, fmt.Errorf("unexpected line from lvm lvs: %q", line)
		}
		lvs = append(lvs, LV{Name: strings.TrimSpace(name), Active: attr[4] == 'a', Open: attr[5] == 'o'})
	}
	return lvs, nil
}

// Activate makes vg's logical volumes appear (vgchange -ay VG); already
// active is success.
func (l LVM) Activate(ctx context.Context, vg string) error {
	_, err := l.lvm(ctx, "vgchange", "-ay", vg)
	return err
}

// Deactivate removes vg's device-mapper devices (vgchange -an VG); it
// fails while one is open, and inactive is success.
func (l LVM) Deactivate(ctx context.Context, vg string) error {
	_, err := l.lvm(ctx, "vgchange", "-an", vg)
	return err
}

// DMName is the device-mapper name lvm gives vg/lv: each name with its
// dashes doubled, joined by one dash (lvm2 lib/activate dev_manager.c
// dm_build_dm_name), e.g. XSLocalEXT--1a2b-...-1a2b-... .
func DMName(vg, lv string) string {
	return strings.ReplaceAll(vg, "-", "--") + "-" + strings.ReplaceAll(lv, "-", "--")
}

// DevPath is where the active LV's node is, under devDir/mapper.
func DevPath(devDir, vg, lv string) string {
	return filepath.Join(devDir, "mapper", DMName(vg, lv))
}

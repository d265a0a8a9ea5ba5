package luksext

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/sr-types/luksext/adopt"
)

// AdoptRequest is one `luksext adopt DEVICE`: the disk, a passphrase that
// opens Keyslot (the operator command found it: a binding that unseals,
// or the recovery passphrase), the names of the VDIs (--names), and the
// test hook called after each step (AdoptSteps).
type AdoptRequest struct {
	Device  string
	Pass    secret.Bytes
	Keyslot int
	Names   map[string]adopt.Names
	Crash   func(step string)
}

// AdoptResult is what the administrator needs next.
type AdoptResult struct {
	SRUUID   string
	Device   string // the stable path stored in the SR record
	LUKSUUID string
	Layout   string
	// Changed is false when the disk was adopted already.
	Changed bool
	Plan    adopt.Plan
	// DeviceConfig is the PBD's device-config (xe pbd-create).
	DeviceConfig map[string]string
}

// AdoptedName is the SR name luksext adopt records (xe sr-introduce sets
// xapi's; SR.set_name changes both).
const AdoptedName = "Encrypted local SR"

var vgRE = regexp.MustCompile(`^XSLocalEXT-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$`)

// adoptTempName maps the disk while adopt reads which SR it holds (the
// SR uuid, and so the final mapping name, is only in the LVM metadata).
func adoptTempName(luksUUID string) string { return luks.NamePrefix + "adopt-" + luksUUID }

// AdoptPrecheck refuses, before any key is asked for, a disk that is
// open under a mapping adopt did not make (the hand-made recipe's
// luks-<uuid>, typically still opened by its systemd unit), or that is
// already a luksext SR of its own making. done reports an adopted disk.
func (h *Host) AdoptPrecheck(dev string, info luks.Info) (done bool, err error) {
	if md := info.Metadata; md != nil {
		switch {
		case md.State == stateReady && md.Layout == LayoutLVM:
			return true, nil
		case md.State != stateAdopting:
			return false, smapi.Errorf(smapi.KindNotAdoptable, "%s is already luksext SR %s (made by SR.create, not a hand-made SMAPIv1 SR); there is nothing to adopt", dev, md.SRUUID)
		}
	}
	_, err = h.s.adoptMapping(dev, info)
	return false, err
}

// adoptMapping checks the mappings open on dev: none, or only ones an
// interrupted adopt left (the temporary one, or luksext-<sr uuid>, whose
// SR uuid it returns: before the disk metadata is written that mapping
// is the only record of which SR a crashed run had found).
func (s *srService) adoptMapping(dev string, info luks.Info) (string, error) {
	held, err := holders(dev, s.sysDir())
	if err != nil {
		return "", err
	}
	var foreign []string
	srUUID := ""
	for _, n := range held {
		u, isOurs := strings.CutPrefix(n, luks.NamePrefix)
		switch {
		case n == adoptTempName(info.UUID):
		case isOurs && validUUID(u) && (info.Metadata == nil || info.Metadata.SRUUID == u):
			srUUID = u
		default:
			foreign = append(foreign, "/dev/mapper/"+n)
		}
	}
	if len(foreign) > 0 {
		return "", smapi.Errorf(smapi.KindInUse, "%s is open as %s; unplug and forget the SMAPIv1 SR, then close the old mapping and disable its unit (vgchange -an XSLocalEXT-<sr uuid>; cryptsetup close %s; systemctl disable clevis-luks-unlock@%s), and run luksext adopt again", dev, strings.Join(foreign, ", "), strings.TrimPrefix(foreign[0], "/dev/mapper/"), info.UUID)
	}
	return srUUID, nil
}

// holders are the dm names of the devices stacked on dev
// (/sys/class/block/<dev>/holders/<dm-N>/dm/name).
func holders(dev, sys string) ([]string, error) {
	real, err := filepath.EvalSymlinks(dev)
	if err != nil {
		return nil, smapi.Errorf(smapi.KindDeviceNotFound, "%s: %v", dev, err)
	}
	dir := filepath.Join(sys, "class", "block", filepath.Base(real), "holders")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // not a block device sysfs knows (tests on files)
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sys, "class", "block", e.Name(), "dm", "name"))
		if err != nil {
			out = append(out, e.Name())
			continue
		}
		out = append(out, strings.TrimSpace(string(b)))
	}
	sort.Strings(out)
	return out, nil
}

// Adopt turns the SMAPIv1 ext SR on req.Device into a luksext SR of
// layout lvm, in place: same SR uuid, every VHD recorded under its own
// uuid. See adoptRun for the order and what a crash leaves.
func (h *Host) Adopt(ctx context.Context, req AdoptRequest) (AdoptResult, error) {
	s := h.s
	log := smapi.Logger(ctx).WithField("dev", req.Device)
	info, err := s.LUKS.Inspect(req.Device)
	if err != nil {
		return AdoptResult{}, err
	}
	res := AdoptResult{Device: StablePath(req.Device, s.DevDir), LUKSUUID: info.UUID, Layout: LayoutLVM}
	done, err := h.AdoptPrecheck(req.Device, info)
	if err != nil {
		return res, err
	}
	// The disk's own lock first (no SR uuid known yet), then the SR's.
	release, err := s.lockSR(ctx, info.UUID)
	if err != nil {
		return res, err
	}
	defer release()
	state := ""
	if info.Metadata != nil {
		state, res.SRUUID = info.Metadata.State, info.Metadata.SRUUID
	}
	if done {
		res.DeviceConfig = adoptedConfig(res)
		return res, nil
	}
	if res.SRUUID == "" {
		if res.SRUUID, err = s.adoptMapping(req.Device, info); err != nil {
			return res, err
		}
	}
	if res.SRUUID == "" {
		if res.SRUUID, err = s.discoverSR(ctx, req, info.UUID); err != nil {
			return res, err
		}
	}
	log = log.WithField("sr_uuid", res.SRUUID)
	unlockSR, err := s.lockSR(ctx, res.SRUUID)
	if err != nil {
		return res, err
	}
	defer unlockSR()
	if _, ok, err := s.FS.MountedAt(s.mountpoint(res.SRUUID)); err != nil {
		return res, err
	} else if ok {
		return res, smapi.Errorf(smapi.KindInUse, "something is mounted at %s; unplug the SR first (xe pbd-unplug)", s.mountpoint(res.SRUUID))
	}
	name := luks.SRName(res.SRUUID)
	if err := s.LUKS.Open(ctx, req.Device, name, req.Pass, req.Keyslot); err != nil {
		return res, err
	}
	disk := &hostAdoptDisk{s: s, ctx: ctx, dev: req.Device, srUUID: res.SRUUID, mnt: filepath.Join(s.StateDir, "adopt-"+res.SRUUID)}
	run := adoptRun{Disk: disk, State: state, Names: req.Names, Crash: req.Crash,
		Meta: SRMeta{UUID: res.SRUUID, Name: AdoptedName, LUKSUUID: info.UUID, Device: res.Device, Layout: LayoutLVM}}
	plan, err := run.run()
	if err != nil {
		return res, err
	}
	res.Plan, res.Changed, res.DeviceConfig = plan, true, adoptedConfig(res)
	log.WithField("volumes", len(plan.Nodes)).Info("SR adopted from SMAPIv1")
	return res, nil
}

func adoptedConfig(r AdoptResult) map[string]string {
	return map[string]string{KeyDevice: r.Device, KeySRUUID: r.SRUUID, KeyLUKSUUID: r.LUKSUUID}
}

// discoverSR maps the disk under a temporary name just long enough to
// read its volume group's name, XSLocalEXT-<sr uuid>, then closes it.
func (s *srService) discoverSR(ctx context.Context, req AdoptRequest, luksUUID string) (string, error) {
	l, err := s.lvmOps()
	if err != nil {
		return "", err
	}
	tmp := adoptTempName(luksUUID)
	if err := s.LUKS.Open(ctx, req.Device, tmp, req.Pass, req.Keyslot); err != nil {
		return "", err
	}
	mapper := s.LUKS.MapperPath(tmp)
	closeTmp := func() error { return s.LUKS.Close(context.WithoutCancel(ctx), tmp) }
	pvs, err := l.PVs(ctx)
	if err != nil {
		_ = closeTmp()
		return "", err
	}
	vg := ""
	for _, pv := range pvs {
		if pv.Name == mapper || sameBlockDevice(pv.Name, mapper) {
			vg = pv.VG
		}
	}
	m := vgRE.FindStringSubmatch(vg)
	if m == nil {
		_ = closeTmp()
		what := "no LVM volume group"
		if vg != "" {
			what = "volume group " + vg
		}
		return "", smapi.Errorf(smapi.KindNotAdoptable, "%s holds %s, not XSLocalEXT-<sr uuid>: it is not an SMAPIv1 ext SR (nothing was changed)", req.Device, what)
	}
	// udev may have activated the group on the temporary mapping (lvm2's
	// event activation): deactivate it, refusing if something uses it.
	if lvs, err := l.LVs(ctx, vg); err == nil {
		for _, lv := range lvs {
			if lv.Open {
				_ = closeTmp()
				return "", smapi.Errorf(smapi.KindInUse, "the logical volume %s/%s is open (mounted?); unplug the SMAPIv1 SR first", vg, lv.Name)
			}
		}
	}
	// udev's lvm rules may activate the group again behind us (lvm2's
	// event activation runs asynchronously): a few tries.
	for try := 0; ; try++ {
		err := l.Deactivate(ctx, vg)
		if err == nil {
			err = closeTmp()
		}
		if err == nil {
			return m[1], nil
		}
		if try == 4 {
			return "", fmt.Errorf("closing the temporary mapping %s: %w", tmp, err)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// hostAdoptDisk is adoptDisk on the host: the SR's mapping, its volume
// group, its LV mounted at a staging mountpoint under StateDir.
type hostAdoptDisk struct {
	s      *srService
	ctx    context.Context
	dev    string
	srUUID string
	mnt    string
}

func (d *hostAdoptDisk) lvPath() string { return lvm.DevPath(d.s.DevDir, VGName(d.srUUID), d.srUUID) }

func (d *hostAdoptDisk) Mount() (string, error) {
	s, ctx := d.s, d.ctx
	lvPath := d.lvPath()
	if src, ok, err := s.FS.MountedAt(d.mnt); err != nil {
		return "", err
	} else if ok {
		if sameBlockDevice(src, lvPath) {
			return d.mnt, nil // a crashed run's staging mount
		}
		return "", smapi.Errorf(smapi.KindInUse, "%s is mounted from %s; unmount it", d.mnt, src)
	}
	l, err := s.lvmOps()
	if err != nil {
		return "", err
	}
	vg := VGName(d.srUUID)
	mapper := s.LUKS.MapperPath(luks.SRName(d.srUUID))
	if err := s.checkVGOn(ctx, l, vg, mapper); err != nil {
		return "", smapi.Wrap(smapi.KindNotAdoptable, err)
	}
	lvs, err := l.LVs(ctx, vg)
	if err != nil {
		return "", err
	}
	if len(lvs) != 1 || lvs[0].Name != d.srUUID {
		var names []string
		for _, lv := range lvs {
			names = append(names, lv.Name)
		}
		return "", smapi.Errorf(smapi.KindNotAdoptable, "the volume group %s holds the logical volume(s) %s; an SMAPIv1 ext SR has exactly one, %s (nothing was changed)", vg, strings.Join(names, ", "), d.srUUID)
	}
	if lvs[0].Open {
		return "", smapi.Errorf(smapi.KindInUse, "the logical volume %s/%s is open (mounted?); unplug the SMAPIv1 SR first (xe pbd-unplug), nothing was changed", vg, d.srUUID)
	}
	if err := l.Activate(ctx, vg); err != nil {
		return "", err
	}
	repaired, err := s.FS.Fsck(ctx, lvPath)
	if err != nil {
		return "", smapi.Wrap(smapi.KindNeedsAttention, err)
	}
	if repaired {
		smapi.Logger(ctx).Warn("e2fsck repaired the filesystem of the SR being adopted")
	}
	if err := s.FS.Mount(ctx, lvPath, d.mnt); err != nil {
		return "", err
	}
	return d.mnt, nil
}

func (d *hostAdoptDisk) Release() error {
	ctx := context.WithoutCancel(d.ctx)
	if err := d.s.FS.Unmount(ctx, d.mnt); err != nil {
		return err
	}
	if err := d.s.releaseLayout(ctx, d.srUUID, LayoutLVM); err != nil {
		return err
	}
	return d.s.LUKS.Close(ctx, luks.SRName(d.srUUID))
}

func (d *hostAdoptDisk) SetState(state string) error {
	if err := d.s.LUKS.WriteMetadata(d.ctx, d.dev, luks.Metadata{SRUUID: d.srUUID, State: state, Layout: LayoutLVM}); err != nil {
		return fmt.Errorf("writing the luksext metadata of %s: %w", d.dev, err)
	}
	return nil
}

package luksext

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// attach opens and mounts the SR described by the PBD's device-config (the
// configuration SR.create returned) and returns its mountpoint. It runs at
// every host boot with nobody at the console, so the key comes from the
// TPM/Tang bindings; it is idempotent (already mounted: same answer).
func (s *srService) attach(ctx context.Context, p smapi.SRAttachParams) (string, error) {
	srUUID := p.Configuration[KeySRUUID]
	if !validUUID(srUUID) {
		return "", smapi.Errorf(smapi.KindInvalidConfiguration, "device-config:%s is missing or not a uuid; it is written by SR.create (use xe sr-probe-ext type=%s to find it)", KeySRUUID, PluginName)
	}
	log := smapi.Logger(ctx).WithField("sr_uuid", srUUID)
	ctx, steps := withAttachSteps(ctx)
	unlock, err := s.lockSR(ctx, srUUID)
	if err != nil {
		return "", err
	}
	defer unlock()

	mnt := s.mountpoint(srUUID)
	if _, ok, err := s.FS.MountedAt(mnt); err != nil {
		return "", err
	} else if ok {
		if _, err := s.check().verify(srUUID, mnt); err == nil { // from luksext-<uuid>, record naming it
			log.Info("SR already attached")
			return mnt, nil
		}
		return "", smapi.Errorf(smapi.KindInUse, "%s is mounted but is not SR %s; unmount it first", mnt, srUUID)
	}

	t0 := time.Now()
	dev, err := s.findDevice(p.Configuration)
	if err != nil {
		return "", err
	}
	steps.since("find_device", t0)
	layout := LayoutDirect
	md, ok, err := s.LUKS.ReadMetadata(dev)
	if err != nil {
		// the layout is read, never guessed: no record, no attach
		return "", fmt.Errorf("reading the luksext metadata of %s: %w", dev, err)
	}
	if ok {
		switch {
		case md.SRUUID != srUUID:
			return "", smapi.Errorf(smapi.KindSRDoesNotExist, "%s holds SR %s, not %s", dev, md.SRUUID, srUUID)
		case md.State == stateAdopting:
			return "", smapi.Errorf(smapi.KindNeedsAttention, "the adoption of SR %s on %s did not finish; run 'luksext adopt %s' again, then plug the SR", srUUID, dev, dev)
		case md.State != stateReady:
			return "", smapi.Errorf(smapi.KindNeedsAttention, "SR %s on %s was never finished (SR.create was interrupted); run xe sr-create again or destroy it", srUUID, dev)
		}
		if err := checkLayout(md.Layout, srUUID); err != nil {
			return "", err
		}
		layout = md.Layout
	}

	name := luks.SRName(srUUID)
	var fallback *recoverySource
	if fb, _ := parseBool(p.Configuration, KeyRecoveryFallback); fb {
		fallback = &recoverySource{SecretUUID: p.Configuration[KeyRecoveryPassword+secretSuffix], Plain: p.Configuration[KeyRecoveryPassword]}
	}
	viaRecovery, err := s.unlockDeviceVia(ctx, dev, name, fallback)
	if err != nil {
		return "", err
	}
	fsdev, err := s.filesystemDevice(ctx, srUUID, layout)
	if err != nil {
		return "", err
	}
	t0 = time.Now()
	repaired, err := s.FS.Fsck(ctx, fsdev)
	steps.since("fsck", t0)
	if err != nil {
		return "", smapi.Wrap(smapi.KindNeedsAttention, err)
	}
	if repaired {
		log.Warn("e2fsck repaired the SR filesystem (was the host reset while the SR was attached?)")
	}
	t0 = time.Now()
	if err := s.FS.Mount(ctx, fsdev, mnt); err != nil {
		return "", err
	}
	steps.since("mount", t0)
	meta, err := readSRMeta(mnt)
	if err == nil && meta.UUID != srUUID {
		err = smapi.Errorf(smapi.KindSRDoesNotExist, "the filesystem on %s belongs to SR %s, not %s", dev, meta.UUID, srUUID)
	}
	if err == nil && meta.Layout != layout {
		err = smapi.Errorf(smapi.KindNeedsAttention, "the SR record of %s says layout %q but its disk's luksext metadata says %q", srUUID, meta.Layout, layout)
	}
	if err == nil {
		err = mountedStoreDirs(mnt) // the GC's lock directories (plugins/lock creates none); cached allocations invalidated
	}
	if err != nil {
		if uerr := s.FS.Unmount(context.WithoutCancel(ctx), mnt); uerr != nil {
			log.WithError(uerr).Warn("could not unmount after a failed attach; SR.detach will")
		}
		return "", err
	}
	if s.GC != nil {
		t0 = time.Now()
		if err := s.GC.Start(ctx, mnt); err != nil {
			log.WithError(err).Warn("could not start the volume garbage collector")
		}
		steps.since("gc_start", t0)
	}
	if viaRecovery != "" {
		s.markAutoUnlockBroken(ctx, srUUID, "was opened with the recovery passphrase kept in xapi because automatic unlock failed ("+viaRecovery+")")
	}
	log.WithField("mountpoint", mnt).WithFields(steps.fields()).Info("SR attached")
	return mnt, nil
}

// findDevice locates the SR's disk: the stored path when it still carries
// the SR's LUKS header, else the device whose LUKS UUID matches (disk
// names and even by-id paths can change when a disk moves between ports).
func (s *srService) findDevice(cfg map[string]string) (string, error) {
	path, luksUUID := cfg[KeyDevice], cfg[KeyLUKSUUID]
	if path != "" {
		if info, err := s.LUKS.Inspect(path); err == nil && (luksUUID == "" || strings.EqualFold(info.UUID, luksUUID)) {
			return path, nil
		}
	}
	if luksUUID != "" {
		if dev, err := s.LUKS.FindByUUID(luksUUID); err == nil {
			return dev, nil
		}
	}
	return "", smapi.Errorf(smapi.KindDeviceNotFound, "the SR's disk was not found: %s is absent or holds another header, and no disk has LUKS UUID %s (is the disk connected? ls -l /dev/disk/by-uuid)", orNone(path), orNone(luksUUID))
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// srUUIDOf turns an sr handle (the mountpoint) into the SR uuid
// (SRCheck.parse: the syntax only; SR state is checked under the lock).
func (s *srService) srUUIDOf(sr string) (string, error) {
	u, _, err := s.check().parse(sr)
	return u, err
}

// detach unmounts and closes. It never fails because something is already
// gone; it fails only when the SR is still in use.
func (s *srService) detach(ctx context.Context, p smapi.SRParams) (smapi.Unit, error) {
	srUUID, err := s.srUUIDOf(p.SR)
	if err != nil {
		return smapi.Unit{}, err
	}
	unlock, err := s.lockSR(ctx, srUUID)
	if err != nil {
		return smapi.Unit{}, err
	}
	defer unlock()
	return smapi.Unit{}, s.teardown(ctx, srUUID)
}

func (s *srService) teardown(ctx context.Context, srUUID string) error {
	mnt := s.mountpoint(srUUID)
	// Unmounting through a link planted at the mountpoint would unmount
	// whatever it points to (fs.KernelMounter also refuses to follow one;
	// this says why in words).
	if st, err := os.Lstat(mnt); err == nil && st.Mode()&os.ModeSymlink != 0 {
		return smapi.Errorf(smapi.KindNeedsAttention, "SR mountpoint %s is a symbolic link, which luksext never makes; refusing to unmount what it points to (remove it: rm %s)", mnt, mnt)
	}
	if s.GC != nil {
		if err := s.GC.Stop(ctx, mnt); err != nil {
			smapi.Logger(ctx).WithError(err).Warn("stopping the volume garbage collector")
		}
	}
	if err := s.FS.Unmount(ctx, mnt); err != nil {
		return smapi.Wrap(smapi.KindInUse, fmt.Errorf("%w (a VM disk or a shell may still use the SR: fuser -vm %s)", err, mnt))
	}
	layout, err := s.openLayout(srUUID)
	if err != nil {
		// e.g. the disk is gone: close as before; the close fails (busy)
		// if a volume group is still active on the mapping
		smapi.Logger(ctx).WithError(err).Warn("could not read the SR's recorded layout; closing the mapping directly")
		layout = LayoutDirect
	}
	if err := s.releaseLayout(ctx, srUUID, layout); err != nil {
		return err
	}
	if err := s.LUKS.Close(ctx, luks.SRName(srUUID)); err != nil {
		return err
	}
	smapi.Logger(ctx).WithField("sr_uuid", srUUID).Info("SR detached")
	return nil
}

// destroy crypto-erases the SR. xapi calls it on an attached SR and does
// not detach afterwards, so it tears everything down itself. It refuses
// while volumes are in use by VMs.
func (s *srService) destroy(ctx context.Context, p smapi.SRParams) (smapi.Unit, error) {
	srUUID, err := s.srUUIDOf(p.SR)
	if err != nil {
		return smapi.Unit{}, err
	}
	unlock, err := s.lockSR(ctx, srUUID)
	if err != nil {
		return smapi.Unit{}, err
	}
	defer unlock()
	mnt := s.mountpoint(srUUID)
	// The SR must be what it claims before anything is erased: mounted
	// at its mountpoint from luksext-<uuid>, its record naming it, and
	// (proveDisk) the disk's LUKS header naming it and backing that mapping.
	h, err := s.check().verify(srUUID, mnt)
	if err != nil {
		return smapi.Unit{}, err
	}
	meta := h.Meta
	if inUse, err := s.volumesInUse(mnt); err != nil {
		return smapi.Unit{}, err
	} else if len(inUse) > 0 {
		return smapi.Unit{}, smapi.Errorf(smapi.KindInUse, "SR %s still has volumes attached to VMs (%s); shut the VMs down or detach the disks first", srUUID, strings.Join(inUse, ", "))
	}
	dev, err := s.findDevice(map[string]string{KeyDevice: meta.Device, KeyLUKSUUID: meta.LUKSUUID})
	if err != nil {
		return smapi.Unit{}, err
	}
	if err := s.proveDisk(dev, srUUID, meta.LUKSUUID); err != nil {
		return smapi.Unit{}, err
	}
	if err := s.teardown(ctx, srUUID); err != nil {
		return smapi.Unit{}, err
	}
	if err := s.LUKS.Erase(ctx, dev); err != nil {
		return smapi.Unit{}, fmt.Errorf("erasing the LUKS header of %s: %w", dev, err)
	}
	smapi.Logger(ctx).WithFields(map[string]any{"sr_uuid": srUUID, "dev": dev}).Info("SR destroyed: every keyslot and the header area are erased")
	return smapi.Unit{}, nil
}

// volumesInUse lists volumes of the SR that a datapath has active. The
// datapath keeps one state file per attached volume under its state dir.
func (s *srService) volumesInUse(mnt string) ([]string, error) {
	if s.InUse == nil {
		return nil, nil
	}
	return s.InUse(mnt)
}

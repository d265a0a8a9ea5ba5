package luksext

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
)

// VolumeDeps are the edges of the volume handlers (Volume.*, SR.ls).
type VolumeDeps struct {
	// Images does the image-file work; its Runner (qemu-img) is only needed
	// for qcow2 volumes (> 2040 GiB). The zero value handles VHDs.
	Images image.Files
	// LockTimeout bounds waiting for the SR lock (default 2 minutes):
	// xapi applies no timeout, so a stuck lock must become an error.
	LockTimeout time.Duration
	// InUse lists the images below a directory that VMs still have
	// attached (the datapath's records); nil means none can be.
	InUse func(dir string) ([]string, error)
	// Handles checks the sr argument of every call (zero value: the
	// host's /var/run/sr-mount, mountinfo and /dev/mapper).
	Handles SRCheck
	// Datapath pauses the tapdisk serving a VM's leaf around changes to
	// images it has open (volume_live.go); nil: no VM can have any open.
	Datapath *attachment.Manager
	// Fault, when set (tests), is called after each step of a snapshot or
	// clone (SnapshotSteps); a test kills the process there to prove
	// that the next call converges.
	Fault func(step string)
	// QCOW2 says whether this host's tapdisk can open qcow2 images
	// (tapdisk.SupportsDiskType); nil skips the check.
	QCOW2 func() error
}

// MaxChainDepth is the longest image chain a snapshot may create (SMAPIv1
// and libcow use 30; XO's chain check cannot see SMAPIv3 chains, so we
// bound it ourselves).
const MaxChainDepth = 30

// ErrChainTooDeep: a snapshot would make the chain longer than
// MaxChainDepth.
var ErrChainTooDeep = errors.New("snapshot chain too long")

// Lock file names under <sr>/.luksext/locks.
const srLockName = "sr"

func srLockPath(st store.Store) string { return st.Path("locks", srLockName+".lock") }

func volumeLockPath(st store.Store, key string) string {
	return st.Path("locks", "volume-"+key+".lock")
}

// volumes is one call's view of an attached SR.
type volumes struct {
	d   VolumeDeps
	st  store.Store
	log logrus.FieldLogger
	// release drops the checked SR handle (SRCheck.open); the SR lock
	// taken by shared/exclusive releases it with itself.
	release func()
}

// openVolumes checks the SR handle and holds it (the SR stays mounted)
// until the SR lock that the caller takes next is released; the store
// works on the canonical mountpoint, whatever spelling the caller used.
func openVolumes(ctx context.Context, d VolumeDeps, sr string) (*volumes, error) {
	h, release, err := d.Handles.open(ctx, sr, d.lockTimeout())
	if err != nil {
		return nil, err
	}
	return &volumes{d: d, st: store.New(h.Path), log: smapi.Logger(ctx), release: release}, nil
}

func (d VolumeDeps) lockTimeout() time.Duration {
	if d.LockTimeout == 0 {
		return 2 * time.Minute
	}
	return d.LockTimeout
}

func (v *volumes) lock(ctx context.Context, path string, mode lock.Mode) (*lock.Lock, error) {
	ctx, cancel := context.WithTimeout(ctx, v.d.lockTimeout())
	defer cancel()
	return lock.Acquire(ctx, path, mode, v.log)
}

// srLock takes the SR's image-tree lock; releasing it also releases the
// SR handle.
func (v *volumes) srLock(ctx context.Context, mode lock.Mode) (*lock.Lock, error) {
	l, err := v.lock(ctx, srLockPath(v.st), mode)
	if err != nil {
		v.release()
		return nil, err
	}
	l.OnRelease(v.release)
	return l, nil
}

// exclusive takes the SR lock for a change of the image tree and first
// finishes any operation a crashed call left half done.
func (v *volumes) exclusive(ctx context.Context) (*lock.Lock, error) {
	l, err := v.srLock(ctx, lock.Exclusive)
	if err != nil {
		return nil, err
	}
	if err := v.recover(ctx); err != nil {
		l.Release()
		return nil, err
	}
	return l, nil
}

func (v *volumes) shared(ctx context.Context) (*lock.Lock, error) {
	return v.srLock(ctx, lock.Shared)
}

// openVDI is the prologue of every call on one existing VDI: the SR must be
// attached, the SR lock taken (exclusive: a change of the image tree, which
// first finishes a crashed call's work), and key must name a VDI. The
// caller releases the lock.
func openVDI(ctx context.Context, d VolumeDeps, sr, key string, exclusive bool) (*volumes, store.Node, *lock.Lock, error) {
	v, err := openVolumes(ctx, d, sr)
	if err != nil {
		return nil, store.Node{}, nil, err
	}
	take := v.shared
	if exclusive {
		take = v.exclusive
	}
	l, err := take(ctx)
	if err != nil {
		return nil, store.Node{}, nil, err
	}
	n, err := v.vdi(key)
	if err != nil {
		l.Release()
		return nil, store.Node{}, nil, err
	}
	return v, n, l, nil
}

// vdi reads the record of volume key, which must be a VDI.
func (v *volumes) vdi(key string) (store.Node, error) {
	n, err := v.st.Get(key)
	if errors.Is(err, store.ErrNotFound) || (err == nil && n.VDI == nil) {
		return n, smapi.Errorf(smapi.KindVolumeDoesNotExist, "volume %s does not exist in SR %s", key, v.st.SR)
	}
	return n, err
}

// toVolume renders a VDI record for xapi: its own copy of the keys, and
// the leaf's allocated bytes now (tapdisk grows images behind our back).
func (v *volumes) toVolume(n store.Node) smapi.Volume {
	var phys int64
	var st syscall.Stat_t
	if err := syscall.Stat(v.st.ImagePath(n), &st); err == nil {
		phys = st.Blocks * 512
	}
	keys := make(map[string]string, len(n.VDI.Keys))
	maps.Copy(keys, n.VDI.Keys)
	uuid := n.ID
	path := v.st.SR + "/" + n.File()
	return smapi.Volume{
		Key: n.ID, UUID: &uuid, Name: n.VDI.Name, Description: n.VDI.Description,
		ReadWrite: n.VDI.ReadWrite, Sharable: n.VDI.Sharable, VirtualSize: n.VirtualSize,
		PhysicalUtilisation: phys, URI: []string{VolumeURI(path)}, Keys: keys,
	}
}

// volumeMethods are the Volume.* implementations and SR.ls.
func volumeMethods(d Deps) []smapi.Method {
	vd := d.Volumes
	return []smapi.Method{
		smapi.Handle("SR.ls", smapi.ResultVolumeList, func(ctx context.Context, p smapi.SRParams) (smapi.StreamResult, error) {
			return srLs(ctx, vd, p)
		}),
		smapi.Handle("Volume.create", smapi.ResultVolume, func(ctx context.Context, p smapi.VolumeCreateParams) (smapi.Volume, error) {
			return volumeCreate(ctx, vd, p)
		}),
		smapi.Handle("Volume.stat", smapi.ResultVolume, func(ctx context.Context, p smapi.VolumeParams) (smapi.Volume, error) {
			return volumeStat(ctx, vd, p)
		}),
		smapi.Handle("Volume.destroy", smapi.ResultUnit, func(ctx context.Context, p smapi.VolumeParams) (smapi.Unit, error) {
			return smapi.Unit{}, volumeDestroy(ctx, vd, p)
		}),
		smapi.Handle("Volume.set", smapi.ResultUnit, func(ctx context.Context, p smapi.VolumeSetParams) (smapi.Unit, error) {
			return smapi.Unit{}, updateVDI(ctx, vd, p.SR, p.Key, func(x *store.VDI) {
				if x.Keys == nil {
					x.Keys = map[string]string{}
				}
				x.Keys[p.K] = p.V
			})
		}),
		smapi.Handle("Volume.unset", smapi.ResultUnit, func(ctx context.Context, p smapi.VolumeUnsetParams) (smapi.Unit, error) {
			return smapi.Unit{}, updateVDI(ctx, vd, p.SR, p.Key, func(x *store.VDI) { delete(x.Keys, p.K) })
		}),
		smapi.Handle("Volume.set_name", smapi.ResultUnit, func(ctx context.Context, p smapi.VolumeSetNameParams) (smapi.Unit, error) {
			return smapi.Unit{}, updateVDI(ctx, vd, p.SR, p.Key, func(x *store.VDI) { x.Name = p.NewName })
		}),
		smapi.Handle("Volume.set_description", smapi.ResultUnit, func(ctx context.Context, p smapi.VolumeSetDescriptionParams) (smapi.Unit, error) {
			return smapi.Unit{}, updateVDI(ctx, vd, p.SR, p.Key, func(x *store.VDI) { x.Description = p.NewDescription })
		}),
		smapi.Handle("Volume.resize", smapi.ResultUnit, func(ctx context.Context, p smapi.VolumeResizeParams) (smapi.Unit, error) {
			return smapi.Unit{}, volumeResize(ctx, vd, p)
		}),
		smapi.Handle("Volume.snapshot", smapi.ResultVolume, func(ctx context.Context, p smapi.VolumeParams) (smapi.Volume, error) {
			return volumeSnapshot(ctx, vd, p, false)
		}),
		smapi.Handle("Volume.clone", smapi.ResultVolume, func(ctx context.Context, p smapi.VolumeParams) (smapi.Volume, error) {
			return volumeSnapshot(ctx, vd, p, true)
		}),
	}
}

func volumeStat(ctx context.Context, d VolumeDeps, p smapi.VolumeParams) (smapi.Volume, error) {
	v, n, l, err := openVDI(ctx, d, p.SR, p.Key, false)
	if err != nil {
		return smapi.Volume{}, err
	}
	defer l.Release()
	return v.toVolume(n), nil
}

func volumeCreate(ctx context.Context, d VolumeDeps, p smapi.VolumeCreateParams) (smapi.Volume, error) {
	format, size, err := image.Choose(p.Size)
	if err != nil {
		return smapi.Volume{}, err
	}
	v, err := openVolumes(ctx, d, p.SR)
	if err != nil {
		return smapi.Volume{}, err
	}
	if err := checkFormatServed(d, format, p.Size); err != nil {
		return smapi.Volume{}, err
	}
	l, err := v.exclusive(ctx)
	if err != nil {
		return smapi.Volume{}, err
	}
	defer l.Release()
	n := store.Node{ID: store.NewID(), Format: format, VirtualSize: size,
		VDI: &store.VDI{Name: p.Name, Description: p.Description, ReadWrite: true, Sharable: p.Sharable, Keys: map[string]string{}}}
	// Image first, record second: a crash in between leaves an image with
	// no record, which the GC removes; never a record without its image.
	if err := d.Images.Create(ctx, v.st.ImagePath(n), size); err != nil {
		return smapi.Volume{}, fmt.Errorf("creating the image of volume %q: %w", p.Name, err)
	}
	if err := v.st.Put(n); err != nil {
		return smapi.Volume{}, err
	}
	v.log.WithFields(logrus.Fields{"vol": n.ID, "format": format, "virtual_size": size}).Info("volume created")
	return v.toVolume(n), nil
}

func volumeDestroy(ctx context.Context, d VolumeDeps, p smapi.VolumeParams) error {
	v, n, l, err := openVDI(ctx, d, p.SR, p.Key, true)
	if err != nil {
		return err
	}
	defer l.Release()
	if d.InUse != nil {
		path := v.st.ImagePath(n)
		active, err := d.InUse(filepath.Dir(path))
		if err != nil {
			return err
		}
		for _, a := range active {
			if a == filepath.Base(path) {
				return smapi.Errorf(smapi.KindInUse, "volume %s is attached to a VM; shut the VM down or unplug the disk first", p.Key)
			}
		}
	}
	// Record first: once it is gone the VDI no longer exists for xapi; the
	// leaf file left by a crash here is garbage the GC removes. Its parent
	// (a hidden base) is left for the GC to delete or coalesce.
	if err := v.st.Delete(n.ID); err != nil {
		return err
	}
	if err := os.Remove(v.st.ImagePath(n)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	v.log.WithField("vol", n.ID).Info("volume destroyed")
	return nil
}

// updateVDI changes a VDI's own record (keys, name, description) under the
// shared SR lock and the volume's lock: calls on different volumes run in
// parallel, calls on the same one are serialised.
func updateVDI(ctx context.Context, d VolumeDeps, sr, key string, change func(*store.VDI)) error {
	v, err := openVolumes(ctx, d, sr)
	if err != nil {
		return err
	}
	sl, err := v.shared(ctx)
	if err != nil {
		return err
	}
	defer sl.Release()
	if !store.ValidID(key) {
		return smapi.Errorf(smapi.KindVolumeDoesNotExist, "volume %q does not exist in SR %s", key, sr)
	}
	vl, err := v.lock(ctx, volumeLockPath(v.st, key), lock.Exclusive)
	if err != nil {
		return err
	}
	defer vl.Release()
	n, err := v.vdi(key)
	if err != nil {
		return err
	}
	change(n.VDI)
	return v.st.Put(n)
}

func volumeResize(ctx context.Context, d VolumeDeps, p smapi.VolumeResizeParams) error {
	v, n, l, err := openVDI(ctx, d, p.SR, p.Key, true)
	if err != nil {
		return err
	}
	defer l.Release()
	if p.NewSize < n.VirtualSize {
		return fmt.Errorf("volume %s is %d bytes; cannot resize it to %d: %w", n.ID, n.VirtualSize, p.NewSize, image.ErrShrink)
	}
	if p.NewSize == n.VirtualSize {
		return nil
	}
	size := p.NewSize
	if n.Format == store.FormatVHD {
		_, size, err = image.Choose(p.NewSize)
		if err != nil {
			return err
		}
		if size > image.VHDMax {
			return fmt.Errorf("volume %s is a VHD, which cannot grow past 2040 GiB: %w", n.ID, image.ErrTooLarge)
		}
	} else {
		size = image.RoundResize(n.Format, size) // qemu-img resizes by whole sectors
	}
	// Journalled, then done with the leaf's tapdisk paused (volume_live.go);
	// image first: the record's size never claims more than the image has.
	j := resizeJournal{VDI: n.ID, Size: size}
	jpath := resizeJournalPath(v.st, n.ID)
	if err := store.WriteJSON(jpath, j); err != nil {
		return err
	}
	if err := v.finishResize(ctx, j); err != nil {
		if errors.Is(err, attachment.ErrPauseFailed) {
			return errors.Join(err, removeJournal(jpath)) // nothing was changed
		}
		return err
	}
	return removeJournal(jpath)
}

// checkFormatServed refuses, before anything is written, a qcow2 volume a
// VM on this host could never use: upstream blktap 3.55.5 has no qcow2
// tapdisk driver, only XCP-ng's qcow2 builds do, and without the check the
// failure would surface only when a VM using the disk starts. A host with
// no tapdisk at all (no VM can start here anyway) is not refused.
func checkFormatServed(d VolumeDeps, format string, requested int64) error {
	if format != store.FormatQCOW2 || d.QCOW2 == nil {
		return nil
	}
	err := d.QCOW2()
	if err == nil || errors.Is(err, tapdisk.ErrNoTapdisk) {
		return nil
	}
	if errors.Is(err, tapdisk.ErrDiskTypeUnsupported) {
		return smapi.Errorf(smapi.KindInvalidParameters,
			"a volume of %d bytes needs the qcow2 format (VHD stops at 2040 GiB), and this host's tapdisk cannot open qcow2 images (%v); create volumes of at most 2040 GiB, or install XCP-ng's qcow2-enabled blktap", requested, err)
	}
	return fmt.Errorf("checking whether tapdisk can open qcow2 images: %w", err)
}

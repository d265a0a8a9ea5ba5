package luksext

import (
	"context"
	"path/filepath"
	"time"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/smapi"
)

// DefaultMountRoot is where XCP-ng mounts file-based SRs.
const DefaultMountRoot = "/var/run/sr-mount"

// DefaultStateDir holds lock files and temporary mountpoints (tmpfs: a
// reboot clears it, as it should).
const DefaultStateDir = "/run/luksext"

// KeyCustody seals and unseals keyslot passphrases (plugins/clevis).
type KeyCustody interface {
	Encrypt(ctx context.Context, cfg clevis.Config, plaintext secret.Bytes) (string, error)
	Decrypt(ctx context.Context, jwe string) (secret.Bytes, error)
}

// SecretStore resolves and removes xapi Secret objects (plugins/xapi).
type SecretStore interface {
	SecretValue(ctx context.Context, uuid string) (secret.Bytes, error)
	DestroySecret(ctx context.Context, uuid string) error
}

// SRDeps are the edges of the SR lifecycle handlers (SR.*).
type SRDeps struct {
	LUKS    *luks.Manager
	Keys    KeyCustody
	Secrets SecretStore
	FS      *fs.FS
	// Probe answers "does this device hold data?" (blockdev.Prober).
	Probe SignatureProber
	// MountRoot is /var/run/sr-mount; StateDir /run/luksext; DevDir /dev.
	MountRoot, StateDir, DevDir string
	// SysDir is /sys (which disk a dm mapping is on).
	SysDir string
	// InUse lists the volumes of a mounted SR that VMs still use (from
	// the datapath's state); nil means none can be.
	InUse func(srMount string) ([]string, error)
	// GC starts and stops the volume garbage collector of a mounted SR
	// (RealDeps: the volume binary as `volume gc <sr>`); nil runs none.
	GC GCControl
	// Notify posts XAPI messages on the SR (plugins/xapi); nil posts none.
	Notify Notifier
	// LVM activates the volume group of SRs adopted from SMAPIv1
	// (LayoutLVM, plugins/lvm); nil: such SRs are refused.
	LVM LVMOps
}

// SignatureProber says what a device already holds (blockdev.Prober).
type SignatureProber interface {
	CheckUnused(ctx context.Context, path string, force bool) ([]blockdev.Signature, error)
}

// GCControl starts/stops the background GC of an SR.
type GCControl interface {
	Start(ctx context.Context, sr string) error
	Stop(ctx context.Context, sr string) error
}

// processGC runs the collector as a detached process of the volume binary
// (volume_gc.go).
type processGC struct{}

func (processGC) Start(_ context.Context, sr string) error { return StartGC(sr) }
func (processGC) Stop(_ context.Context, sr string) error  { return StopGC(sr, 30*time.Second) }

type srService struct{ SRDeps }

func (d SRDeps) withDefaults() SRDeps {
	if d.MountRoot == "" {
		d.MountRoot = DefaultMountRoot
	}
	if d.StateDir == "" {
		d.StateDir = DefaultStateDir
	}
	if d.DevDir == "" {
		d.DevDir = "/dev"
	}
	return d
}

func (s *srService) mountpoint(srUUID string) string { return filepath.Join(s.MountRoot, srUUID) }

// srMethods are the SR.* implementations.
func srMethods(d Deps) []smapi.Method {
	if d.SR.LUKS == nil {
		return nil // not wired (unit tests of other capabilities)
	}
	s := &srService{d.SR.withDefaults()}
	create := smapi.Handle("SR.create", smapi.ResultConfiguration, s.create)
	create.Timeout = 2 * time.Hour // mkfs on a large disk; TPM work
	attach := smapi.Handle("SR.attach", smapi.ResultString, s.attach)
	attach.Timeout = time.Hour // fsck of a large filesystem
	destroy := smapi.Handle("SR.destroy", smapi.ResultUnit, s.destroy)
	return []smapi.Method{
		create, attach, destroy,
		smapi.Handle("SR.detach", smapi.ResultUnit, s.detach),
		smapi.Handle("SR.stat", smapi.ResultSRStat, s.stat),
		smapi.Handle("SR.set_name", smapi.ResultUnit, s.setName),
		smapi.Handle("SR.set_description", smapi.ResultUnit, s.setDescription),
		smapi.Handle("SR.probe", smapi.ResultProbe, s.probe),
	}
}

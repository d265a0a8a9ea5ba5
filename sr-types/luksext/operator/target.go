package operator

import (
	"context"
	"errors"
	"fmt"
	"github.com/luksext/luksext/sr-types/luksext"
	"os"
	"strings"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// target is the disk a verb works on.
type target struct {
	Arg    string // as the administrator wrote it
	Dev    string
	Info   luks.Info
	SRUUID string // "" for a LUKS device that is not a luksext SR
	// Name is the dm-crypt mapping: luksext-<sr uuid>, or for a disk
	// bound by hand (seed 01's recipe) luks-<LUKS uuid>, its convention.
	Name string
}

// lockKey names the lock: the SR's, so that we exclude SR.attach/create.
func (t target) lockKey() string {
	if t.SRUUID != "" {
		return t.SRUUID
	}
	return t.Info.UUID
}

func (t target) describe() string {
	if t.SRUUID != "" {
		return fmt.Sprintf("SR %s (%s)", t.SRUUID, t.Dev)
	}
	return t.Dev
}

// resolve finds the disk of SR, given as a device path, an SR uuid or a
// LUKS uuid.
func (a *admin) resolve(arg string) (target, error) {
	if strings.HasPrefix(arg, "/") {
		if _, err := os.Stat(arg); err != nil {
			return target{}, smapi.Errorf(smapi.KindDeviceNotFound, "%s does not exist on this host (check the name with lsblk)", arg)
		}
		info, err := a.LUKS.Inspect(arg)
		if err != nil {
			if errors.Is(err, luks.ErrNotLUKS) {
				return target{}, smapi.Errorf(smapi.KindDeviceNotFound, "%s has no LUKS header: it is not a luksext SR disk", arg)
			}
			return target{}, fmt.Errorf("reading the LUKS header of %s: %w", arg, err)
		}
		return newTarget(arg, arg, info), nil
	}
	if !luksext.ValidUUID(arg) {
		return target{}, usageErr("%q is neither an SR uuid nor a device path", arg)
	}
	// Attached: the SR record names its disk.
	if m, err := luksext.ReadSRMeta(a.Mountpoint(arg)); err == nil && strings.EqualFold(m.UUID, arg) {
		if dev, err := a.FindDevice(map[string]string{luksext.KeyDevice: m.Device, luksext.KeyLUKSUUID: m.LUKSUUID}); err == nil {
			if info, err := a.LUKS.Inspect(dev); err == nil {
				return newTarget(arg, dev, info), nil
			}
		}
	}
	for _, dev := range a.CandidateDisks() {
		info, err := a.LUKS.Inspect(dev)
		if err == nil && strings.EqualFold(info.SRUUID(), arg) {
			return newTarget(arg, luksext.StablePath(dev, a.DevDir), info), nil
		}
	}
	// A LUKS uuid also names a disk (blkid, /dev/disk/by-uuid).
	if dev, err := a.LUKS.FindByUUID(arg); err == nil {
		if info, err := a.LUKS.Inspect(dev); err == nil {
			return newTarget(arg, dev, info), nil
		}
	}
	return target{}, smapi.Errorf(smapi.KindSRDoesNotExist, "no disk on this host holds luksext SR %s ('luksext status' lists the SRs found; is the disk connected?)", arg)
}

func newTarget(arg, dev string, info luks.Info) target {
	t := target{Arg: arg, Dev: dev, Info: info, SRUUID: info.SRUUID()}
	if t.SRUUID != "" {
		t.Name = luks.SRName(t.SRUUID)
	} else {
		t.Name = "luks-" + info.UUID
	}
	return t
}

// lock takes the SR lock SR.attach and SR.create take, waiting at most
// LockWait for a running SMAPI call.
func (a *admin) lock(ctx context.Context, t target) (func(), error) {
	lctx, cancel := context.WithTimeout(ctx, a.LockWait)
	defer cancel()
	return a.LockSR(lctx, t.lockKey())
}

// refresh re-reads the header after a change.
func (a *admin) refresh(t *target) error {
	info, err := a.LUKS.Inspect(t.Dev)
	if err != nil {
		return fmt.Errorf("reading the LUKS header of %s: %w", t.Dev, err)
	}
	t.Info = info
	return nil
}

// bindingOf returns the clevis binding of keyslot slot, if any.
func bindingOf(info luks.Info, slot int) (luks.Binding, bool) {
	for _, b := range info.Bindings {
		if b.Keyslot == slot {
			return b, true
		}
	}
	return luks.Binding{}, false
}

func hasKeyslot(info luks.Info, slot int) bool {
	for _, k := range info.Keyslots {
		if k.ID == slot {
			return true
		}
	}
	return false
}

// passphraseSlots are the keyslots without a clevis binding: the recovery
// passphrase(s) a person typed.
func passphraseSlots(info luks.Info) []int {
	var out []int
	for _, k := range info.Keyslots {
		if _, bound := bindingOf(info, k.ID); !bound {
			out = append(out, k.ID)
		}
	}
	return out
}

package luks

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
)

// NamePrefix starts the LUKS label and the dm-crypt name of every SR.
const NamePrefix = "luksext-"

// SRName is the LUKS label and dm-crypt mapping name for an SR:
// "luksext-<sr_uuid>" (44 characters, under LUKS2's 47-character label
// limit).
func SRName(srUUID string) string { return NamePrefix + srUUID }

// FormatOptions describe a new LUKS device.
type FormatOptions struct {
	// Version is 1 or 2; 0 picks LUKS2 when cryptsetup supports it.
	Version int
	// UUID is the LUKS UUID to write (so that the SR can be found again
	// through /dev/disk/by-uuid).
	UUID string
	// Label is written on LUKS2 (LUKS1 has no label field).
	Label string
	// Passphrase goes into keyslot Keyslot.
	Passphrase secret.Bytes
	Keyslot    int
	KDF        KDF
	// Force erases existing signatures instead of refusing.
	Force bool
}

// Format creates a LUKS header on dev with aes-xts-plain64, a 512-bit
// volume key and 512-byte sectors, and returns the LUKS version used.
func (m *Manager) Format(ctx context.Context, dev string, o FormatOptions) (int, error) {
	if o.Passphrase.IsEmpty() {
		return 0, errors.New("BUG: Format called without a passphrase")
	}
	if _, err := os.Stat(dev); err != nil {
		return 0, fmt.Errorf("%s: %w", dev, ErrDeviceNotFound)
	}
	if err := blockdev.CheckExclusive(dev); err != nil {
		return 0, err
	}
	sigs, err := blockdev.Prober{Run: m.run}.CheckUnused(ctx, dev, o.Force)
	if err != nil {
		return 0, err
	}
	if len(sigs) > 0 {
		m.log.WithFields(logrus.Fields{"dev": dev, "signatures": len(sigs)}).Warn("erasing existing signatures (force)")
		if err := blockdev.Wipe(dev); err != nil {
			return 0, err
		}
	}
	caps, err := m.Capabilities(ctx)
	if err != nil {
		return 0, err
	}
	version := o.Version
	switch {
	case version == 0 && caps.LUKS2:
		version = 2
	case version == 0:
		version = 1
	case version == 2 && !caps.LUKS2:
		return 0, fmt.Errorf("LUKS2 requested but cryptsetup %s only writes LUKS1: %w", caps, ErrNotSupported)
	case version != 1 && version != 2:
		return 0, fmt.Errorf("BUG: LUKS version %d", version)
	}

	args := []string{"luksFormat", "--batch-mode"}
	if caps.LUKS2 {
		args = append(args, "--type", "luks"+strconv.Itoa(version))
	}
	args = append(args, "--cipher", "aes-xts-plain64", "--key-size", "512")
	if version == 2 {
		// 512-byte sectors: tapdisk and vhd-util write 512-byte O_DIRECT
		// I/O, which a 4096-sector dm-crypt refuses (EINVAL for I/O not
		// aligned to the sector size, kernel drivers/md/dm-crypt.c);
		// cryptsetup >= 2.4 would pick 4096 by itself on 4Kn/512e disks.
		args = append(args, "--sector-size", "512")
		if o.Label != "" {
			args = append(args, "--label", o.Label)
		}
	}
	if o.UUID != "" {
		args = append(args, "--uuid", o.UUID)
	}
	args = append(args, o.KDF.args(version, caps)...)
	args = append(args, "--key-slot", strconv.Itoa(o.Keyslot), "--key-file=-", dev)

	log := m.log.WithFields(logrus.Fields{"dev": dev, "luks_version": version, "keyslot": o.Keyslot})
	log.Info("formatting LUKS device")
	if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: args, Stdin: o.Passphrase}); err != nil {
		return 0, fmt.Errorf("formatting %s as LUKS%d: %w", dev, version, err)
	}
	return version, nil
}

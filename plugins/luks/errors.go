package luks

import (
	"errors"
	"fmt"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/run"
)

// Error kinds. Callers classify with errors.Is; messages are written for an
// XCP-ng administrator reading `xe` output or SMlog.
var (
	// ErrWrongPassphrase: no keyslot (or not the one asked for) accepts the
	// passphrase (cryptsetup exit code 2).
	ErrWrongPassphrase = errors.New("no keyslot accepts this passphrase")
	// ErrBusy: the device or mapping is in use or already exists
	// (cryptsetup exit code 5).
	ErrBusy = errors.New("device is busy or already in use")
	// ErrNotLUKS: the device has no readable LUKS header.
	ErrNotLUKS = errors.New("not a LUKS device")
	// ErrDeviceNotFound: the path does not exist or is not a device/file.
	ErrDeviceNotFound = errors.New("device not found")
	// ErrSignaturePresent: the device holds data we refuse to overwrite
	// without force (same value as blockdev.ErrSignaturePresent).
	ErrSignaturePresent = blockdev.ErrSignaturePresent
	// ErrToolMissing: cryptsetup (or another tool) is not installed (same
	// value as run.ErrToolMissing).
	ErrToolMissing = run.ErrToolMissing
	// ErrNoSpace: the LUKS metadata area cannot hold another token or
	// luksmeta slot, or no keyslot is free.
	ErrNoSpace = errors.New("no room left in the LUKS metadata")
	// ErrNotSupported: the installed cryptsetup or the device's LUKS
	// version cannot do what was asked.
	ErrNotSupported = errors.New("not supported by this LUKS version or cryptsetup")
)

// cryptsetup's documented exit codes (cryptsetup(8) "RETURN CODES").
const (
	exitWrongParams = 1
	exitNoPerm      = 2 // bad passphrase
	exitOOM         = 3
	exitWrongDevice = 4
	exitBusy        = 5
)

// classify attaches an error kind to a failed cryptsetup run, chosen by exit
// code only: stderr wording changes between cryptsetup versions and
// locales, exit codes do not.
func classify(err error, dev string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, run.ErrToolMissing) {
		return fmt.Errorf("cryptsetup is not installed on this host: %w", err)
	}
	switch run.ExitCode(err) {
	case exitNoPerm:
		return fmt.Errorf("%s: %w: %w", dev, ErrWrongPassphrase, err)
	case exitBusy:
		return fmt.Errorf("%s: %w: %w", dev, ErrBusy, err)
	case exitWrongDevice:
		return fmt.Errorf("%s: %w: %w", dev, ErrDeviceNotFound, err)
	}
	return err
}

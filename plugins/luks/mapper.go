package luks

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
)

// MapperPath is where the opened (decrypted) device appears.
func (m *Manager) MapperPath(name string) string {
	return filepath.Join(m.DevDir, "mapper", name)
}

// IsOpen reports whether the dm-crypt mapping name exists.
func (m *Manager) IsOpen(name string) bool {
	_, err := os.Stat(m.MapperPath(name))
	return err == nil
}

// Open maps dev as /dev/mapper/<name> with the passphrase of keyslot slot
// (-1: try every slot, slow when an argon2 slot comes first). An existing
// mapping of that name is success, so a retried SR.attach converges.
//
// A known keyslot is mapped without cryptsetup (open_dm.go) unless
// OpenWith says otherwise; cryptsetup opens the rest, with only
// `cryptsetup open --type luks --key-file=- [--key-slot N]`:
// it works the same from cryptsetup 1.6 to 2.x, for LUKS1 and LUKS2.
// dom0 runs kernel 4.19, so no dm-crypt flag newer than that is asked for
// (--perf-no_read_workqueue and --perf-no_write_workqueue need 5.9); the
// mapping is plain aes-xts-plain64 with 512-byte sectors (format.go).
func (m *Manager) Open(ctx context.Context, dev, name string, pass secret.Bytes, slot int) error {
	log := m.log.WithFields(logrus.Fields{"dev": dev, "dm_name": name, "keyslot": slot})
	if m.IsOpen(name) {
		if err := notOurMapping(dev, name); err != nil {
			return err
		}
		log.Info("dm-crypt mapping already exists")
		return nil
	}
	h, err := readHeader(dev)
	if err != nil {
		return err
	}
	if live, err := m.cleanStale(h, name, log); err != nil || live {
		if live {
			log.Info("dm-crypt mapping already exists (no node yet)")
			return m.waitNode(name, m.devnoOf(name), nil, log)
		}
		return err
	}
	if slot >= 0 && m.OpenWith == OpenAuto {
		err := m.openDM(dev, name, h, pass, slot, log)
		var fb errFallback
		if !errors.As(err, &fb) {
			if err == nil {
				log.Info("opened dm-crypt mapping with device-mapper ioctls")
			}
			return err
		}
		log.WithField("reason", fb.reason).Info("opening with cryptsetup instead of device-mapper ioctls")
	}
	args := []string{"open", "--type", "luks", "--key-file=-"}
	if slot >= 0 {
		args = append(args, "--key-slot", strconv.Itoa(slot))
	}
	args = append(args, dev, name)
	log.Info("opening dm-crypt mapping")
	if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: args, Stdin: pass}); err != nil {
		if errors.Is(err, ErrWrongPassphrase) {
			return fmt.Errorf("opening %s: %w", dev, ErrWrongPassphrase)
		}
		return fmt.Errorf("opening %s as %s: %w", dev, name, err)
	}
	return nil
}

// Close removes the mapping; an absent mapping is success. A mapping still
// mounted or held open fails with ErrBusy.
func (m *Manager) Close(ctx context.Context, name string) error {
	if !m.IsOpen(name) {
		// No node; device-mapper may still hold a device of this name:
		// half made by an open killed before its resume (udev makes the
		// node only for a live table), or live without a node (udev not
		// running and the open killed before it made one).
		info, err := dmStatus(name)
		if err != nil {
			return nil // ENXIO: nothing to close; or no device-mapper here
		}
		if !info.live() {
			return m.removeHalfMade(name, info, m.log.WithField("dm_name", name))
		}
	}
	m.log.WithField("dm_name", name).Info("closing dm-crypt mapping")
	if _, err := m.cryptsetup(ctx, name, run.Cmd{Args: []string{"close", name}}); err != nil {
		// Lost a race with another close: the goal is reached.
		if !m.IsOpen(name) {
			return nil
		}
		return fmt.Errorf("closing %s: %w", name, err)
	}
	return nil
}

// FindByUUID returns the device holding the LUKS header with this UUID,
// through udev's /dev/disk/by-uuid link (device names like /dev/sdb can
// change across reboots; the UUID cannot). udev's 60-persistent-storage
// rules made that link for crypto_LUKS long before systemd 219, dom0's.
func (m *Manager) FindByUUID(uuid string) (string, error) {
	link := filepath.Join(m.DevDir, "disk", "by-uuid", uuid)
	dev, err := filepath.EvalSymlinks(link)
	if err != nil {
		return "", fmt.Errorf("no device with LUKS UUID %s (looked for %s): %w", uuid, link, ErrDeviceNotFound)
	}
	h, err := readHeader(dev)
	if err != nil {
		return "", err
	}
	if h.uuid != uuid {
		return "", fmt.Errorf("%s points to %s, whose LUKS UUID is %s: %w", link, dev, h.uuid, ErrDeviceNotFound)
	}
	return dev, nil
}

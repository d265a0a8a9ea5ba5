package luks

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
)

// NewKeyslotPassphrase returns 256 random bits as 43 base64url characters.
// Printable and newline-free, because clevis hands the unsealed JWE
// plaintext to cryptsetup verbatim through a shell pipe (clevis
// src/luks/clevis-luks-common-functions.in, clevis_luks_unlock_device).
func NewKeyslotPassphrase() (secret.Bytes, error) {
	raw, err := secret.Random(32)
	if err != nil {
		return secret.Bytes{}, err
	}
	defer raw.Wipe()
	out := make([]byte, base64.RawURLEncoding.EncodedLen(raw.Len()))
	base64.RawURLEncoding.Encode(out, raw.Expose())
	return secret.New(out), nil
}

// Keyslots lists the active keyslots, by id.
func (m *Manager) Keyslots(dev string) ([]Keyslot, error) {
	h, err := readHeader(dev)
	if err != nil {
		return nil, err
	}
	return h.keyslots, nil
}

// FreeKeyslot returns the lowest unused keyslot id.
func (m *Manager) FreeKeyslot(dev string) (int, error) {
	h, err := readHeader(dev)
	if err != nil {
		return 0, err
	}
	for i := 0; i < h.maxKeyslots(); i++ {
		if !h.hasKeyslot(i) {
			return i, nil
		}
	}
	return 0, fmt.Errorf("%s: all %d keyslots are used: %w", dev, h.maxKeyslots(), ErrNoSpace)
}

// AddKeyslot adds newPass in keyslot slot (-1: the lowest free one),
// authorised by existing, and returns the slot used. existing goes on
// stdin, newPass through an inherited pipe: neither touches argv or disk.
func (m *Manager) AddKeyslot(ctx context.Context, dev string, existing, newPass secret.Bytes, slot int, kdf KDF) (int, error) {
	h, err := readHeader(dev)
	if err != nil {
		return 0, err
	}
	if slot < 0 {
		if slot, err = m.FreeKeyslot(dev); err != nil {
			return 0, err
		}
	}
	caps, err := m.Capabilities(ctx)
	if err != nil {
		return 0, err
	}
	args := []string{"luksAddKey", "--batch-mode", "--key-file=-", "--key-slot", strconv.Itoa(slot)}
	args = append(args, kdf.args(h.version, caps)...)
	args = append(args, dev, "/dev/fd/3")
	m.log.WithFields(logrus.Fields{"dev": dev, "keyslot": slot}).Info("adding keyslot")
	if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: args, Stdin: existing, ExtraFiles: []secret.Bytes{newPass}}); err != nil {
		return 0, fmt.Errorf("adding keyslot %d to %s: %w", slot, dev, err)
	}
	return slot, nil
}

// RemoveKeyslot destroys keyslot slot. Removing an unused slot succeeds
// (convergent). It does not ask for a passphrase: whoever may run the
// plugin may already erase the whole device. LUKS1 slots are destroyed in
// Go (killslot.go), LUKS2 slots with `cryptsetup luksKillSlot`.
func (m *Manager) RemoveKeyslot(ctx context.Context, dev string, slot int) error {
	h, err := readHeader(dev)
	if err != nil {
		return err
	}
	if !h.hasKeyslot(slot) {
		return nil
	}
	log := m.log.WithFields(logrus.Fields{"dev": dev, "keyslot": slot, "luks_version": h.version})
	if h.version == 1 {
		// Not luksKillSlot: cryptsetup 1.7.x (dom0's) asks for another
		// passphrase there whenever stdin is not a tty (killslot.go).
		log.Info("removing keyslot (LUKS1, in Go as libcryptsetup does)")
		if err := killLUKS1Slot(dev, slot); err != nil {
			return fmt.Errorf("removing keyslot %d from %s: %w", slot, dev, err)
		}
		return nil
	}
	// Refuse an unsupported cryptsetup before touching the header.
	caps, err := m.Capabilities(ctx)
	if err != nil {
		return err
	}
	if !caps.LUKS2 {
		return fmt.Errorf("%s is LUKS2 but this host's cryptsetup %s only knows LUKS1: %w", dev, caps, ErrNotSupported)
	}
	log.Info("removing keyslot")
	// cryptsetup >= 2.0.0 destroys a keyslot in batch mode without asking
	// for another passphrase (checked with 2.0.3 and 2.6.1).
	if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: []string{"luksKillSlot", "--batch-mode", dev, strconv.Itoa(slot)}}); err != nil {
		return fmt.Errorf("removing keyslot %d from %s: %w", slot, dev, err)
	}
	return nil
}

// TestKeyslot checks that pass opens keyslot slot (-1: any slot) without
// mapping anything. A wrong passphrase is ErrWrongPassphrase.
func (m *Manager) TestKeyslot(ctx context.Context, dev string, pass secret.Bytes, slot int) error {
	if _, err := readHeader(dev); err != nil {
		return err
	}
	args := []string{"open", "--type", "luks", "--test-passphrase", "--key-file=-"}
	if slot >= 0 {
		args = append(args, "--key-slot", strconv.Itoa(slot))
	}
	args = append(args, dev)
	_, err := m.cryptsetup(ctx, dev, run.Cmd{Args: args, Stdin: pass})
	if err != nil {
		if errors.Is(err, ErrWrongPassphrase) {
			return fmt.Errorf("keyslot %d of %s: %w", slot, dev, ErrWrongPassphrase)
		}
		return fmt.Errorf("testing keyslot %d of %s: %w", slot, dev, err)
	}
	return nil
}

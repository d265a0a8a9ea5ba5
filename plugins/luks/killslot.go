package luks

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
)

// LUKS1 keyslot destruction in Go.
//
// cryptsetup 1.7.x's `luksKillSlot` asks for "any remaining passphrase"
// whenever stdin is not a terminal, even with --batch-mode
// (src/cryptsetup.c action_luksKillSlot: `if (!opt_batch_mode ||
// opt_key_file || !isatty(STDIN_FILENO)) verify_keyslot(...)`; 2.0.0
// dropped the isatty clause). XCP-ng 8.3's dom0 has 1.7.4 and only LUKS1,
// and the callers that remove a slot (unbind, rebind, recovery
// rotate/remove, rollbacks, the journal replaying an interrupted change)
// do not always hold another key. So LUKS1 slots are destroyed here, on
// every cryptsetup version, exactly as libcryptsetup's LUKS_del_key
// (lib/luks1/keymanage.c) does it: the key material area is overwritten
// first, then the slot's header record is set to DISABLED (0x0000DEAD)
// with its salt and iteration count zeroed; the material offset and stripe
// count stay, since they describe the slot's fixed area (LUKS1 on-disk
// format, "key slot" table). A crash between the two steps leaves a slot
// still marked active whose material is noise: no passphrase opens it, and
// the next call (the journal's replay) finishes the job.

const (
	luks1KeyslotOff    = 6 + 2 + 32 + 32 + 32 + 4 + 4 + 20 + 32 + 4 + 40 // 208
	luks1KeyslotSize   = 48
	luks1KeyslotOffVal = 0x0000DEAD
)

// killLUKS1Slot destroys keyslot slot of the LUKS1 device at path.
// Destroying an unused slot succeeds (convergent).
func killLUKS1Slot(path string, slot int) error {
	if slot < 0 || slot >= luks1NumKeyslots {
		return fmt.Errorf("%s: LUKS1 keyslot %d does not exist (0-%d): %w", path, slot, luks1NumKeyslots-1, ErrNotSupported)
	}
	f, h, err := openLUKS1(path, os.O_RDWR)
	if err != nil {
		return err
	}
	defer f.Close() // openLUKS1 took the writers' lock
	ks := h.v1.Keyslots[slot]
	if ks.Active != luks1KeyslotOn {
		return nil
	}
	// lib/luks1/af.c AF_split_sectors: the material area is keyBytes *
	// stripes rounded up to whole 512-byte sectors.
	start := int64(ks.KeyMaterialOffset) * luks1SectorBytes
	length := (int64(h.v1.KeyBytes)*int64(ks.Stripes) + luks1SectorBytes - 1) / luks1SectorBytes * luks1SectorBytes
	if ks.Stripes == 0 || start < luks1SectorBytes || start+length > h.dataOffset {
		return fmt.Errorf("%s: LUKS1 keyslot %d has an implausible key material area (%d+%d, data at %d); not touching it: %w",
			path, slot, start, length, h.dataOffset, ErrNotSupported)
	}
	noise := make([]byte, length)
	if _, err := rand.Read(noise); err != nil {
		return err
	}
	if _, err := f.WriteAt(noise, start); err != nil {
		return fmt.Errorf("%s: wiping the key material of keyslot %d: %w", path, slot, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	off := luks1Keyslot{Active: luks1KeyslotOffVal, KeyMaterialOffset: ks.KeyMaterialOffset, Stripes: ks.Stripes}
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.BigEndian, &off); err != nil {
		return err
	}
	if _, err := f.WriteAt(buf.Bytes(), int64(luks1KeyslotOff+slot*luks1KeyslotSize)); err != nil {
		return fmt.Errorf("%s: disabling keyslot %d: %w", path, slot, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	// Read back what cryptsetup will read.
	h2, err := readHeaderFrom(f, path)
	if err != nil {
		return fmt.Errorf("%s: header unreadable after disabling keyslot %d: %w", path, slot, err)
	}
	if h2.hasKeyslot(slot) {
		return fmt.Errorf("BUG: %s: keyslot %d still active after it was disabled", path, slot)
	}
	return nil
}

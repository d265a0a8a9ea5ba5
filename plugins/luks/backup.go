package luks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/luksext/luksext/plugins/run"
)

// LUKS1 header backups and luksmeta.
//
// `cryptsetup luksHeaderBackup` of a LUKS1 device saves the phdr and the
// keyslot areas only, rounded up to a page (lib/luks1/keymanage.c
// LUKS_hdr_backup: LUKS_device_sectors, size_round_up to the page size),
// on 1.7.4 and 2.x alike, and luksHeaderRestore writes back just as much.
// luksmeta, where clevis keeps LUKS1 bindings, begins exactly there: at
// the first 4096-aligned offset after the keyslot areas (luksmeta.go). So
// a plain backup loses every binding, and a restore leaves the device's
// current luksmeta next to the restored keyslots (bindings of removed
// slots, none for restored ones). The two functions below make a LUKS1
// backup a byte-exact copy of everything before the data offset, and
// write the luksmeta part back after cryptsetup restored its own part.
// LUKS2 needs neither: its tokens live in the JSON area cryptsetup saves.

// BackupHeader saves everything of dev's LUKS header that opens it
// (keyslots, and for LUKS1 the luksmeta bindings too) to file, a new file.
func (m *Manager) BackupHeader(ctx context.Context, dev, file string) error {
	if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: []string{"luksHeaderBackup", "--batch-mode", dev, "--header-backup-file", file}}); err != nil {
		return fmt.Errorf("cryptsetup luksHeaderBackup of %s: %w", dev, err)
	}
	if err := m.CompleteHeaderBackup(dev, file); err != nil {
		return fmt.Errorf("adding the LUKS1 bindings (luksmeta) to %s: %w", file, err)
	}
	return nil
}

// RestoreHeader writes a BackupHeader file back over dev's header: every
// keyslot, and for LUKS1 the luksmeta bindings that go with them.
func (m *Manager) RestoreHeader(ctx context.Context, dev, file string) error {
	if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: []string{"luksHeaderRestore", "--batch-mode", dev, "--header-backup-file", file}}); err != nil {
		return fmt.Errorf("cryptsetup luksHeaderRestore of %s: %w", dev, err)
	}
	if _, err := m.RestoreHeaderRest(dev, file); err != nil {
		return fmt.Errorf("restoring the LUKS1 bindings (luksmeta) of %s from %s: %w", dev, file, err)
	}
	return nil
}

// CompleteHeaderBackup appends to file, a fresh luksHeaderBackup of dev,
// the rest of dev's metadata up to the data offset (LUKS1 only; LUKS2
// backups are left as they are).
func (m *Manager) CompleteHeaderBackup(dev, file string) error {
	h, err := readHeader(dev)
	if err != nil {
		return err
	}
	if h.version != 1 {
		return nil
	}
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", file, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	start := st.Size()
	if hs, _, err := luksmetaHole(h); err == nil && hs != start {
		return fmt.Errorf("%s: cryptsetup saved %d bytes, luksmeta starts at %d: this cryptsetup's backup layout is not the one luksext knows; nothing was appended", file, start, hs)
	}
	if start >= h.dataOffset {
		return nil
	}
	src, err := os.Open(dev)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dev, err)
	}
	defer src.Close()
	if _, err := io.Copy(io.NewOffsetWriter(f, start), io.NewSectionReader(src, start, h.dataOffset-start)); err != nil {
		return fmt.Errorf("copying the luksmeta area of %s into %s: %w", dev, file, err)
	}
	return f.Sync()
}

// RestoreHeaderRest writes back what cryptsetup's luksHeaderRestore does
// not: the bytes of a completed LUKS1 backup (CompleteHeaderBackup) from
// the end of the keyslot areas to the data offset, i.e. luksmeta. It
// returns false, changing nothing, for a LUKS2 backup or a LUKS1 backup
// that holds only cryptsetup's part.
func (m *Manager) RestoreHeaderRest(dev, file string) (bool, error) {
	b, err := os.Open(file)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", file, err)
	}
	defer b.Close()
	h, err := readHeaderFrom(b, file)
	if err != nil {
		return false, err
	}
	if h.version != 1 {
		return false, nil
	}
	start, _, err := luksmetaHole(h)
	if err != nil {
		return false, err
	}
	st, err := b.Stat()
	if err != nil {
		return false, err
	}
	if st.Size() < h.dataOffset {
		return false, nil
	}
	dst, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("%s: %w", dev, ErrDeviceNotFound)
		}
		return false, fmt.Errorf("opening %s: %w", dev, err)
	}
	defer dst.Close()
	if _, err := io.Copy(io.NewOffsetWriter(dst, start), io.NewSectionReader(b, start, h.dataOffset-start)); err != nil {
		return false, fmt.Errorf("writing the luksmeta area of %s back to %s: %w", file, dev, err)
	}
	return true, dst.Sync()
}

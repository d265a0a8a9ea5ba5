package luks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/run"
)

// Erase crypto-erases dev: every keyslot is destroyed (`cryptsetup
// luksErase`), then the whole metadata area is zeroed - both LUKS2 header
// copies, the keyslot area and, on LUKS1, luksmeta - so that no binding
// or label survives either. The encrypted data is left in place: without
// a keyslot it is noise. Erasing a device that has no LUKS header any
// more succeeds (convergent). The result is verified before returning.
func (m *Manager) Erase(ctx context.Context, dev string) error {
	h, err := readHeader(dev)
	if errors.Is(err, ErrNotLUKS) {
		return m.verifyErased(dev)
	}
	if err != nil {
		return err
	}
	end := metadataEnd(h)
	m.log.WithField("dev", dev).Warn("crypto-erasing LUKS device")
	if len(h.keyslots) > 0 {
		if _, err := m.cryptsetup(ctx, dev, run.Cmd{Args: []string{"luksErase", "--batch-mode", dev}}); err != nil {
			return fmt.Errorf("erasing the keyslots of %s: %w", dev, err)
		}
	}
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dev, err)
	}
	defer f.Close()
	if err := blockdev.ZeroRange(f, 0, end); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flushing %s: %w", dev, err)
	}
	return m.verifyErased(dev)
}

// metadataEnd is where the LUKS metadata ends: the data offset, or for a
// LUKS2 device without a data segment the two headers plus keyslot area.
func metadataEnd(h *header) int64 {
	if h.dataOffset > 0 {
		return h.dataOffset
	}
	end := int64(2 * h.v2.bin.HdrSize)
	var cfg struct {
		KeyslotsSize string `json:"keyslots_size"`
	}
	if raw, ok := h.meta["config"]; ok && json.Unmarshal(raw, &cfg) == nil {
		if n, err := strconv.ParseInt(cfg.KeyslotsSize, 10, 64); err == nil {
			end += n
		}
	}
	return end
}

func (m *Manager) verifyErased(dev string) error {
	if _, err := readHeader(dev); !errors.Is(err, ErrNotLUKS) {
		return fmt.Errorf("BUG: %s still has a LUKS header after erase", dev)
	}
	sigs, err := blockdev.ProbeMagic(dev)
	if err != nil {
		return err
	}
	for _, s := range sigs {
		if s.Type == "crypto_LUKS" {
			return fmt.Errorf("BUG: %s still shows a LUKS signature at %d after erase", dev, s.Offset)
		}
	}
	return nil
}

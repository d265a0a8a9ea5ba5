package luksext

import (
	"encoding/json"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"

	"github.com/luksext/luksext/plugins/smapi"
)

// SRMetaFile is the SR's own record at the root of its filesystem, written
// by SR.create after mkfs: its presence is what makes a mounted directory a
// luksext SR (a half-created SR has none and is never presented as good).
const SRMetaFile = "luksext-sr.json"

// SRMeta is the content of SRMetaFile.
type SRMeta struct {
	Schema      int    `json:"schema"`
	UUID        string `json:"uuid"`
	Name        string `json:"name"`
	Description string `json:"description"`
	LUKSUUID    string `json:"luks_uuid"`
	Device      string `json:"device"`
	// Layout is LayoutDirect ("", omitted) or LayoutLVM; the same value as
	// the disk's luksext metadata.
	Layout string `json:"layout,omitempty"`
}

// readSRMeta reads the SR record of the SR mounted at sr, or fails with
// Sr_not_attached: every SR.*/Volume.* call after attach starts here.
func readSRMeta(sr string) (SRMeta, error) {
	var m SRMeta
	b, err := os.ReadFile(filepath.Join(sr, SRMetaFile))
	if err != nil {
		return m, smapi.Errorf(smapi.KindSRNotAttached, "SR %s is not attached here (no luksext SR is mounted at that path)", sr)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, smapi.Errorf(smapi.KindNeedsAttention, "SR record %s is damaged: %v", filepath.Join(sr, SRMetaFile), err)
	}
	return m, nil
}

// writeSRMeta replaces the SR record atomically (temp file, fsync, rename,
// directory fsync), so a crash leaves the old or the new record, never a
// torn one.
func writeSRMeta(sr string, m SRMeta) error {
	m.Schema = 1
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return durable.WriteFile(filepath.Join(sr, SRMetaFile), append(b, '\n'), 0o600)
}

package luks

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// Metadata is our own small record in the LUKS header, so that the SR
// layer can recognise its device and resume an SR.create that crashed
// between steps. It holds no secret.
type Metadata struct {
	SRUUID string `json:"sr_uuid"`
	// State is the SR layer's progress marker (e.g. "creating", "ready").
	State  string `json:"state"`
	Schema int    `json:"schema"`
	// Layout is what sits on the mapping: "" ext4 directly (SR.create),
	// "lvm" the volume group of an SR adopted from SMAPIv1 (luksext adopt).
	// The SR layer reads it before mounting; it never probes for it.
	Layout string `json:"layout,omitempty"`
}

// MetadataSchema is the current Metadata.Schema.
const MetadataSchema = 1

// metadataTokenType is the LUKS2 token type; cryptsetup keeps unknown
// token types as opaque JSON.
const metadataTokenType = "luksext"

// luksmetaMetadataSlot is where Metadata lives on LUKS1. luksmeta slots
// are independent of keyslots, but clevis uses slot N for keyslot N and
// fills keyslots from 0, so the last slot is the one it reaches last.
const luksmetaMetadataSlot = luks1NumKeyslots - 1

type metadataToken struct {
	Type     string   `json:"type"`
	Keyslots []string `json:"keyslots"`
	Metadata
}

// WriteMetadata stores md, replacing an earlier record.
func (m *Manager) WriteMetadata(ctx context.Context, dev string, md Metadata) error {
	if md.Schema == 0 {
		md.Schema = MetadataSchema
	}
	h, err := readHeader(dev)
	if err != nil {
		return err
	}
	if h.version == 1 {
		if h.hasKeyslot(luksmetaMetadataSlot) {
			return fmt.Errorf("%s: keyslot %d is in use, so its luksmeta slot is reserved for clevis: %w", dev, luksmetaMetadataSlot, ErrNoSpace)
		}
		slots, err := luksmetaSlots(dev)
		if err != nil {
			return err
		}
		if u, used := slots[luksmetaMetadataSlot]; used && u != LuksextLuksmetaUUID {
			return fmt.Errorf("%s: luksmeta slot %d holds foreign data: %w", dev, luksmetaMetadataSlot, ErrNoSpace)
		}
		data, err := json.Marshal(md)
		if err != nil {
			return err
		}
		if err := luksmetaWipe(dev, luksmetaMetadataSlot); err != nil {
			return err
		}
		return luksmetaSave(dev, luksmetaMetadataSlot, LuksextLuksmetaUUID, data)
	}
	tok, err := json.Marshal(metadataToken{Type: metadataTokenType, Keyslots: []string{}, Metadata: md})
	if err != nil {
		return err
	}
	// One read-modify-write through the Go writer whatever the cryptsetup
	// version: replacing is then a single header update, never a window
	// with no record at all.
	return updateTokens(dev, func(h *header, tokens map[string]json.RawMessage) error {
		id := -1
		for k, v := range tokens {
			var t struct{ Type string }
			if json.Unmarshal(v, &t) == nil && t.Type == metadataTokenType {
				id, _ = strconv.Atoi(k)
			}
		}
		if id < 0 {
			if id, err = freeTokenID(tokens); err != nil {
				return err
			}
		}
		tokens[strconv.Itoa(id)] = tok
		return nil
	})
}

// ReadMetadata returns our record, or ok=false when there is none.
func (m *Manager) ReadMetadata(dev string) (md Metadata, ok bool, err error) {
	h, err := readHeader(dev)
	if err != nil {
		return md, false, err
	}
	return metadataOf(dev, h)
}

// metadataOf reads the luksext metadata of dev, whose header is h.
func metadataOf(dev string, h *header) (md Metadata, ok bool, err error) {
	if h.version == 1 {
		data, uuid, found, err := luksmetaLoad(dev, luksmetaMetadataSlot)
		if err != nil || !found || uuid != LuksextLuksmetaUUID {
			return md, false, err
		}
		if err := json.Unmarshal(data, &md); err != nil {
			return md, false, fmt.Errorf("%s: luksext metadata is unreadable: %w", dev, err)
		}
		return md, true, nil
	}
	toks, err := h.tokens()
	if err != nil {
		return md, false, err
	}
	for _, raw := range toks {
		var t metadataToken
		if json.Unmarshal(raw, &t) == nil && t.Type == metadataTokenType {
			return t.Metadata, true, nil
		}
	}
	return md, false, nil
}

// Info is what the LUKS header says about a device.
type Info struct {
	Version  int
	UUID     string
	Label    string
	Keyslots []Keyslot
	Bindings []Binding
	Metadata *Metadata
}

// SRUUID names the SR the device belongs to ("" when it is not ours):
// from our metadata record, else from a "luksext-<uuid>" label.
func (i Info) SRUUID() string {
	if i.Metadata != nil && i.Metadata.SRUUID != "" {
		return i.Metadata.SRUUID
	}
	if s, ok := strings.CutPrefix(i.Label, NamePrefix); ok {
		return s
	}
	return ""
}

// Inspect reads everything Info holds.
func (m *Manager) Inspect(dev string) (Info, error) {
	h, err := readHeader(dev)
	if err != nil {
		return Info{}, err
	}
	// One header read for the whole answer (SR.attach and status call this
	// on every run); only luks.go's token reader opens the device again.
	info := Info{Version: h.version, UUID: h.uuid, Label: h.label, Keyslots: h.keyslots}
	if info.Bindings, err = bindingsOf(dev); err != nil {
		return Info{}, err
	}
	md, ok, err := metadataOf(dev, h)
	if err != nil {
		return Info{}, err
	}
	if ok {
		info.Metadata = &md
	}
	return info, nil
}

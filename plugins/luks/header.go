package luks

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
)

// This file reads the parts of LUKS1 and LUKS2 headers that anatol/luks.go
// does not expose (label, data offset, keyslot KDFs, both LUKS2 header
// copies and their sequence ids) and that the writers in luks2json.go and
// luksmeta.go need. Layouts: cryptsetup docs/on-disk-format.pdf (LUKS1) and
// docs/on-disk-format-luks2.pdf (LUKS2).

var (
	luksMagic        = []byte("LUKS\xba\xbe")
	luks2SecondMagic = []byte("SKUL\xba\xbe")
)

// Offsets at which cryptsetup looks for the LUKS2 secondary header when the
// primary is damaged (lib/luks2/luks2_disk_metadata.c hdr2_offsets).
var luks2SecondaryOffsets = []int64{0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000}

const (
	luks1HeaderSize   = 592
	luks1KeyslotOn    = 0x00AC71F3
	luks2BinarySize   = 4096
	luks1SectorBytes  = 512
	luks1NumKeyslots  = 8
	luks2MaxHeaderLen = 4 << 20
)

// luks2Binary is the 4096-byte binary LUKS2 header (big-endian).
type luks2Binary struct {
	Magic          [6]byte
	Version        uint16
	HdrSize        uint64
	SeqID          uint64
	Label          [48]byte
	ChecksumAlg    [32]byte
	Salt           [64]byte
	UUID           [40]byte
	SubsystemLabel [48]byte
	HdrOffset      uint64
	_              [184]byte
	Checksum       [64]byte
	_              [7 * 512]byte
}

// checksumOffset is where Checksum sits in luks2Binary.
const checksumOffset = 6 + 2 + 8 + 8 + 48 + 32 + 64 + 40 + 48 + 8 + 184

type luks1Keyslot struct {
	Active            uint32
	Iterations        uint32
	Salt              [32]byte
	KeyMaterialOffset uint32 // sectors
	Stripes           uint32
}

type luks1Binary struct {
	Magic         [6]byte
	Version       uint16
	CipherName    [32]byte
	CipherMode    [32]byte
	HashSpec      [32]byte
	PayloadOffset uint32 // sectors
	KeyBytes      uint32
	MKDigest      [20]byte
	MKDigestSalt  [32]byte
	MKDigestIter  uint32
	UUID          [40]byte
	Keyslots      [luks1NumKeyslots]luks1Keyslot
}

// luks2Copy is one valid LUKS2 header copy as found on disk.
type luks2Copy struct {
	offset int64
	bin    luks2Binary
	json   []byte // JSON text without the NUL padding
}

// header is what we know about a device's LUKS metadata.
type header struct {
	version    int
	uuid       string
	label      string // LUKS2 only
	dataOffset int64  // bytes
	keyslots   []Keyslot
	// LUKS1
	v1 *luks1Binary
	// LUKS2: the copy with the highest seqid, and every valid copy.
	v2     *luks2Copy
	copies []luks2Copy
	meta   map[string]json.RawMessage
}

// Keyslot describes one active keyslot.
type Keyslot struct {
	ID int
	// KDF is "pbkdf2", "argon2i" or "argon2id".
	KDF string
	// Priority is LUKS2's keyslot priority (0 ignore, 1 normal, 2 prefer);
	// always 1 for LUKS1.
	Priority int
}

func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// readHeader parses the LUKS header of the device or file at path.
func readHeader(path string) (*header, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", path, ErrDeviceNotFound)
		}
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	defer f.Close()
	return readHeaderFrom(f, path)
}

func readHeaderFrom(r io.ReaderAt, path string) (*header, error) {
	first := make([]byte, 8)
	if _, err := r.ReadAt(first, 0); err != nil {
		return nil, fmt.Errorf("%s: %w (cannot read the first sector: %v)", path, ErrNotLUKS, err)
	}
	if bytes.Equal(first[:6], luksMagic) && binary.BigEndian.Uint16(first[6:]) == 1 {
		return readLUKS1(r, path)
	}
	// LUKS2: the primary may be damaged while a secondary copy survives;
	// cryptsetup accepts either, and so do we.
	return readLUKS2(r, path)
}

func readLUKS1(r io.ReaderAt, path string) (*header, error) {
	buf := make([]byte, luks1HeaderSize)
	if _, err := r.ReadAt(buf, 0); err != nil {
		return nil, fmt.Errorf("%s: %w (short LUKS1 header: %v)", path, ErrNotLUKS, err)
	}
	var b luks1Binary
	if err := binary.Read(bytes.NewReader(buf), binary.BigEndian, &b); err != nil {
		return nil, fmt.Errorf("%s: %w: %v", path, ErrNotLUKS, err)
	}
	h := &header{version: 1, uuid: cstring(b.UUID[:]), dataOffset: int64(b.PayloadOffset) * luks1SectorBytes, v1: &b}
	for i, ks := range b.Keyslots {
		if ks.Active == luks1KeyslotOn {
			h.keyslots = append(h.keyslots, Keyslot{ID: i, KDF: "pbkdf2", Priority: 1})
		}
	}
	return h, nil
}

func readLUKS2Copy(r io.ReaderAt, off int64, magic []byte) (*luks2Copy, error) {
	raw := make([]byte, luks2BinarySize)
	if _, err := r.ReadAt(raw, off); err != nil {
		return nil, err
	}
	if !bytes.Equal(raw[:6], magic) || binary.BigEndian.Uint16(raw[6:8]) != 2 {
		return nil, fmt.Errorf("no LUKS2 header at %d", off)
	}
	var b luks2Binary
	if err := binary.Read(bytes.NewReader(raw), binary.BigEndian, &b); err != nil {
		return nil, err
	}
	size := int64(b.HdrSize)
	if size < 16384 || size > luks2MaxHeaderLen || size&(size-1) != 0 || int64(b.HdrOffset) != off {
		return nil, fmt.Errorf("implausible LUKS2 header at %d", off)
	}
	if cstring(b.ChecksumAlg[:]) != "sha256" {
		return nil, fmt.Errorf("LUKS2 header checksum %q: %w", cstring(b.ChecksumAlg[:]), ErrNotSupported)
	}
	all := make([]byte, size)
	if _, err := r.ReadAt(all, off); err != nil {
		return nil, err
	}
	want := append([]byte(nil), all[checksumOffset:checksumOffset+sha256.Size]...)
	clear(all[checksumOffset : checksumOffset+64])
	if sum := sha256.Sum256(all); !bytes.Equal(sum[:], want) {
		return nil, fmt.Errorf("LUKS2 header at %d: checksum mismatch", off)
	}
	js := all[luks2BinarySize:]
	if i := bytes.IndexByte(js, 0); i >= 0 {
		js = js[:i]
	}
	return &luks2Copy{offset: off, bin: b, json: js}, nil
}

func readLUKS2(r io.ReaderAt, path string) (*header, error) {
	var copies []luks2Copy
	primary, perr := readLUKS2Copy(r, 0, luksMagic)
	if perr == nil {
		copies = append(copies, *primary)
	}
	for _, off := range luks2SecondaryOffsets {
		if primary != nil && off != int64(primary.bin.HdrSize) {
			continue
		}
		if c, err := readLUKS2Copy(r, off, luks2SecondMagic); err == nil {
			copies = append(copies, *c)
			break
		}
	}
	if len(copies) == 0 {
		if perr != nil && errors.Is(perr, ErrNotSupported) {
			return nil, fmt.Errorf("%s: %w", path, perr)
		}
		return nil, fmt.Errorf("%s: %w", path, ErrNotLUKS)
	}
	best := copies[0]
	for _, c := range copies[1:] {
		if c.bin.SeqID > best.bin.SeqID {
			best = c
		}
	}
	h := &header{version: 2, uuid: cstring(best.bin.UUID[:]), label: cstring(best.bin.Label[:]), v2: &best, copies: copies}
	if err := json.Unmarshal(best.json, &h.meta); err != nil {
		return nil, fmt.Errorf("%s: LUKS2 JSON metadata is unreadable: %w", path, err)
	}
	var parts struct {
		Keyslots map[string]struct {
			KDF      struct{ Type string } `json:"kdf"`
			Priority *int                  `json:"priority"`
		} `json:"keyslots"`
		Segments map[string]struct {
			Offset string `json:"offset"`
		} `json:"segments"`
	}
	if err := json.Unmarshal(best.json, &parts); err != nil {
		return nil, fmt.Errorf("%s: LUKS2 JSON metadata is unreadable: %w", path, err)
	}
	for id, ks := range parts.Keyslots {
		n, err := strconv.Atoi(id)
		if err != nil {
			continue
		}
		prio := 1
		if ks.Priority != nil {
			prio = *ks.Priority
		}
		h.keyslots = append(h.keyslots, Keyslot{ID: n, KDF: ks.KDF.Type, Priority: prio})
	}
	sort.Slice(h.keyslots, func(i, j int) bool { return h.keyslots[i].ID < h.keyslots[j].ID })
	h.dataOffset = -1
	for _, s := range parts.Segments {
		if off, err := strconv.ParseInt(s.Offset, 10, 64); err == nil && (h.dataOffset < 0 || off < h.dataOffset) {
			h.dataOffset = off
		}
	}
	return h, nil
}

// tokens returns the LUKS2 tokens by id (raw JSON objects).
func (h *header) tokens() (map[int]json.RawMessage, error) {
	out := map[int]json.RawMessage{}
	if h.version != 2 {
		return out, nil
	}
	raw, ok := h.meta["tokens"]
	if !ok {
		return out, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("LUKS2 tokens are unreadable: %w", err)
	}
	for k, v := range m {
		n, err := strconv.Atoi(k)
		if err != nil {
			return nil, fmt.Errorf("LUKS2 token id %q is not a number", k)
		}
		out[n] = v
	}
	return out, nil
}

func (h *header) hasKeyslot(id int) bool {
	for _, k := range h.keyslots {
		if k.ID == id {
			return true
		}
	}
	return false
}

// maxKeyslots is how many keyslots the format allows.
func (h *header) maxKeyslots() int {
	if h.version == 1 {
		return luks1NumKeyslots
	}
	return 32
}

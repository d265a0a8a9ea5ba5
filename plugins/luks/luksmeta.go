package luks

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"

	"golang.org/x/sys/unix"
)

// luksmeta: how clevis stores bindings on LUKS1, which has no tokens.
//
// latchset/luksmeta keeps a small header and up to eight UUID-typed data
// slots in the gap between the end of the last LUKS1 keyslot area and the
// start of the payload. dom0 has no luksmeta binary, so this file reads and
// writes that layout itself, matching libluksmeta.c byte for byte: header
// at the first 4096-aligned offset after the keyslot areas, big-endian,
// crc32c (Castagnoli) over the header with its crc field zeroed, one crc32c
// per data slot, data allocated first-fit in 4096-byte pages after the
// header page.

// ClevisLuksmetaUUID is the luksmeta slot type clevis uses for its JWEs.
var ClevisLuksmetaUUID = [16]byte{0xcb, 0x6e, 0x89, 0x04, 0x81, 0xff, 0x40, 0xda, 0xa8, 0x4a, 0x07, 0xab, 0x9a, 0xb5, 0x71, 0x5e}

// LuksextLuksmetaUUID (04edf48a-36de-412f-b09d-35aefd4515fb) types our own
// metadata slot on LUKS1: a random UUID, as the luksmeta manual asks new
// users of luksmeta to pick.
var LuksextLuksmetaUUID = [16]byte{0x04, 0xed, 0xf4, 0x8a, 0x36, 0xde, 0x41, 0x2f, 0xb0, 0x9d, 0x35, 0xae, 0xfd, 0x45, 0x15, 0xfb}

var luksmetaMagic = [8]byte{'L', 'U', 'K', 'S', 'M', 'E', 'T', 'A'}

const (
	luksmetaPage    = 4096
	luksmetaVersion = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type luksmetaSlot struct {
	UUID     [16]byte
	Offset   uint32 // from the start of the hole
	Length   uint32
	CRC32C   uint32
	Reserved uint32
}

type luksmetaHeader struct {
	Magic   [8]byte
	Version uint32
	CRC32C  uint32
	Slots   [luks1NumKeyslots]luksmetaSlot
}

func alignUp(n int64) int64   { return (n + luksmetaPage - 1) &^ (luksmetaPage - 1) }
func alignDown(n int64) int64 { return n &^ (luksmetaPage - 1) }

// luksmetaHole returns the byte offset and usable length of the gap.
func luksmetaHole(h *header) (start, length int64, err error) {
	if h.version != 1 {
		return 0, 0, fmt.Errorf("luksmeta needs LUKS1, device is LUKS%d: %w", h.version, ErrNotSupported)
	}
	data := h.dataOffset
	for _, ks := range h.v1.Keyslots {
		// libcryptsetup's crypt_keyslot_area: AF area rounded up to sectors.
		afLen := (int64(h.v1.KeyBytes)*int64(ks.Stripes) + luks1SectorBytes - 1) / luks1SectorBytes * luks1SectorBytes
		end := int64(ks.KeyMaterialOffset)*luks1SectorBytes + afLen
		if start < end {
			start = alignUp(end)
		}
	}
	if start == 0 || start >= data {
		return 0, 0, fmt.Errorf("LUKS1 header leaves no gap for luksmeta: %w", ErrNoSpace)
	}
	return start, alignDown(data - start), nil
}

func encodeLuksmeta(lm luksmetaHeader) []byte {
	lm.Magic = luksmetaMagic
	lm.Version = luksmetaVersion
	lm.CRC32C = 0
	var buf bytes.Buffer
	_ = binary.Write(&buf, binary.BigEndian, &lm)
	b := buf.Bytes()
	binary.BigEndian.PutUint32(b[12:16], crc32.Checksum(b, castagnoli))
	return b
}

var errNoLuksmeta = errors.New("luksmeta is not initialised")

// readLuksmeta reads and verifies the luksmeta header.
func readLuksmeta(f *os.File, h *header) (luksmetaHeader, int64, int64, error) {
	var lm luksmetaHeader
	start, length, err := luksmetaHole(h)
	if err != nil {
		return lm, 0, 0, err
	}
	raw := make([]byte, binary.Size(lm))
	if _, err := f.ReadAt(raw, start); err != nil {
		return lm, 0, 0, fmt.Errorf("reading luksmeta header: %w", err)
	}
	if err := binary.Read(bytes.NewReader(raw), binary.BigEndian, &lm); err != nil {
		return lm, 0, 0, err
	}
	if lm.Magic != luksmetaMagic {
		return lm, start, length, errNoLuksmeta
	}
	if lm.Version != luksmetaVersion {
		return lm, 0, 0, fmt.Errorf("luksmeta version %d: %w", lm.Version, ErrNotSupported)
	}
	want := lm.CRC32C
	clear(raw[12:16])
	if crc32.Checksum(raw, castagnoli) != want {
		return lm, 0, 0, fmt.Errorf("luksmeta header checksum mismatch (metadata damaged)")
	}
	return lm, start, length, nil
}

// luksmetaLoad returns the data and type of luksmeta slot n, or ok=false
// when the slot is empty or luksmeta is not initialised.
func luksmetaLoad(path string, n int) (data []byte, uuid [16]byte, ok bool, err error) {
	f, h, err := openLUKS1(path, os.O_RDONLY)
	if err != nil {
		return nil, uuid, false, err
	}
	defer f.Close()
	lm, start, _, err := readLuksmeta(f, h)
	if errors.Is(err, errNoLuksmeta) {
		return nil, uuid, false, nil
	}
	if err != nil {
		return nil, uuid, false, fmt.Errorf("%s: %w", path, err)
	}
	s := lm.Slots[n]
	if s.UUID == ([16]byte{}) {
		return nil, uuid, false, nil
	}
	data = make([]byte, s.Length)
	if _, err := f.ReadAt(data, start+int64(s.Offset)); err != nil {
		return nil, uuid, false, fmt.Errorf("%s: reading luksmeta slot %d: %w", path, n, err)
	}
	if crc32.Checksum(data, castagnoli) != s.CRC32C {
		return nil, uuid, false, fmt.Errorf("%s: luksmeta slot %d checksum mismatch (metadata damaged)", path, n)
	}
	return data, s.UUID, true, nil
}

// openLUKS1 opens a LUKS1 device and reads its header; opened for
// writing, it first takes the exclusive advisory lock of our writers.
func openLUKS1(path string, flag int) (*os.File, *header, error) {
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("%s: %w", path, ErrDeviceNotFound)
		}
		return nil, nil, fmt.Errorf("opening %s: %w", path, err)
	}
	// Writers take the same advisory lock before reading the header, so
	// two of our own writers never interleave on one header and none acts
	// on a header read before another's change.
	if flag&(os.O_WRONLY|os.O_RDWR) != 0 {
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("locking %s: %w", path, err)
		}
	}
	h, err := readHeaderFrom(f, path)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if h.version != 1 {
		f.Close()
		return nil, nil, fmt.Errorf("%s is LUKS%d; luksmeta is for LUKS1: %w", path, h.version, ErrNotSupported)
	}
	return f, h, nil
}

// luksmetaSave stores data of type uuid in slot n, initialising luksmeta
// first if needed (what `clevis luks bind` does via `luksmeta init`).
// The slot must be empty, as with `luksmeta save`.
func luksmetaSave(path string, n int, uuid [16]byte, data []byte) error {
	f, h, err := openLUKS1(path, os.O_RDWR)
	if err != nil {
		return err
	}
	defer f.Close()
	lm, start, length, err := readLuksmeta(f, h)
	if errors.Is(err, errNoLuksmeta) {
		lm = luksmetaHeader{}
	} else if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if lm.Slots[n].UUID != ([16]byte{}) {
		return fmt.Errorf("%s: luksmeta slot %d is already used: %w", path, n, ErrBusy)
	}
	off := luksmetaFindGap(lm, length, int64(len(data)))
	if off == 0 {
		return fmt.Errorf("%s: %d bytes do not fit in the luksmeta area (%d bytes): %w", path, len(data), length, ErrNoSpace)
	}
	lm.Slots[n] = luksmetaSlot{UUID: uuid, Offset: uint32(off), Length: uint32(len(data)), CRC32C: crc32.Checksum(data, castagnoli)}
	// Data first, header last: a crash in between leaves the old header,
	// which does not point at the new bytes.
	if _, err := f.WriteAt(data, start+off); err != nil {
		return fmt.Errorf("%s: writing luksmeta slot %d: %w", path, n, err)
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if _, err := f.WriteAt(encodeLuksmeta(lm), start); err != nil {
		return fmt.Errorf("%s: writing luksmeta header: %w", path, err)
	}
	return f.Sync()
}

// luksmetaFindGap is libluksmeta's first-fit allocator: the first page
// after the header page where size bytes overlap no other slot.
func luksmetaFindGap(lm luksmetaHeader, length, size int64) int64 {
	size = alignUp(size)
	if length < size {
		return 0
	}
	for off := int64(luksmetaPage); off < length; off += luksmetaPage {
		end := off + size
		if end > length {
			return 0
		}
		clash := false
		for _, s := range lm.Slots {
			if s.UUID == ([16]byte{}) {
				continue
			}
			so, se := int64(s.Offset), int64(s.Offset)+int64(s.Length)
			if off < se && so < end {
				clash = true
				break
			}
		}
		if !clash {
			return off
		}
	}
	return 0
}

// luksmetaWipe zeroes slot n's data and frees the slot. Wiping an empty
// slot succeeds (convergent, unlike `luksmeta wipe`).
func luksmetaWipe(path string, n int) error {
	f, h, err := openLUKS1(path, os.O_RDWR)
	if err != nil {
		return err
	}
	defer f.Close()
	lm, start, _, err := readLuksmeta(f, h)
	if errors.Is(err, errNoLuksmeta) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	s := lm.Slots[n]
	if s.UUID == ([16]byte{}) {
		return nil
	}
	if _, err := f.WriteAt(make([]byte, s.Length), start+int64(s.Offset)); err != nil {
		return fmt.Errorf("%s: wiping luksmeta slot %d: %w", path, n, err)
	}
	lm.Slots[n] = luksmetaSlot{}
	if _, err := f.WriteAt(encodeLuksmeta(lm), start); err != nil {
		return fmt.Errorf("%s: writing luksmeta header: %w", path, err)
	}
	return f.Sync()
}

// luksmetaSlots lists the used luksmeta slots and their types.
func luksmetaSlots(path string) (map[int][16]byte, error) {
	f, h, err := openLUKS1(path, os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	lm, _, _, err := readLuksmeta(f, h)
	if errors.Is(err, errNoLuksmeta) {
		return map[int][16]byte{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := map[int][16]byte{}
	for i, s := range lm.Slots {
		if s.UUID != ([16]byte{}) {
			out[i] = s.UUID
		}
	}
	return out, nil
}

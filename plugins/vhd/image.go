package vhd

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Image is an open dynamic or differencing VHD.
type Image struct {
	f        *os.File
	path     string
	writable bool
	ftr      footer
	hdr      header
	bat      []uint32
	// bitmaps caches block bitmaps read so far.
	bitmaps map[uint32][]byte
}

// Info describes an image.
type Info struct {
	UUID        [16]byte
	Type        int
	VirtualSize int64
	// MaxSize is the virtual size the preallocated BAT allows without
	// relocating data (vhd-util create -S).
	MaxSize    int64
	Hidden     bool
	ParentUUID [16]byte
	// ParentName is the parent's file name from the header.
	ParentName string
	// ParentLocator is the parent path as stored (relative to the child).
	ParentLocator string
}

// CreateOptions tune Create and Snapshot.
type CreateOptions struct {
	// MaxSize preallocates the BAT for this virtual size (vhd-util -S),
	// so that resizes up to it need no relocation. Zero means the size.
	MaxSize int64
	// Now is the creation time (tests); zero means time.Now().
	Now time.Time
}

func roundBlocks(size int64) uint64 { return (uint64(size) + BlockSize - 1) / BlockSize }

// Create writes a new dynamic VHD of size bytes (rounded up to 2 MiB) at
// path, like `vhd-util create -n path -s <MiB> -S <max MiB>`. The file is
// written under a temporary name and renamed into place, so a crash never
// leaves a half-written image under path.
func Create(path string, size int64, o CreateOptions) error {
	return create(path, "", size, o)
}

// Snapshot writes a new differencing VHD at path whose parent is
// parentPath, like `vhd-util snapshot -n path -p parentPath -e -S <max>`:
// the child always links to this parent, even an empty one. parentPath
// must be in the same directory tree; the locators store it relative to
// the child, as libvhd does.
func Snapshot(path, parentPath string, o CreateOptions) error {
	return create(path, parentPath, 0, o)
}

func create(path, parentPath string, size int64, o CreateOptions) error {
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	var parent *Image
	if parentPath != "" {
		p, err := Open(parentPath, false)
		if err != nil {
			return fmt.Errorf("opening parent %s: %w", parentPath, err)
		}
		defer p.Close()
		parent = p
		size = p.VirtualSize()
	}
	if size <= 0 {
		return fmt.Errorf("size %d: %w", size, ErrOutOfRange)
	}
	if size > MaxSize {
		return fmt.Errorf("%d bytes: %w (%d bytes)", size, ErrTooLarge, int64(MaxSize))
	}
	maxSize := o.MaxSize
	if maxSize < size {
		maxSize = size
	}
	if maxSize > MaxSize {
		maxSize = MaxSize
	}
	curr := roundBlocks(size) * BlockSize
	maxBlocks := roundBlocks(maxSize)

	f := footer{Features: 2, FFVersion: 0x00010000, DataOffset: SectorSize, Timestamp: vhdTime(now),
		CrtrVer: creatorVersion, OrigSize: curr, CurrSize: curr, Geometry: chs(curr), Type: TypeDynamic}
	copy(f.Cookie[:], "conectix")
	copy(f.CrtrApp[:], "tap")
	if _, err := rand.Read(f.UUID[:]); err != nil {
		return err
	}
	f.UUID[6] = f.UUID[6]&0x0f | 0x40
	f.UUID[8] = f.UUID[8]&0x3f | 0x80

	h := header{DataOffset: ^uint64(0), TableOffset: 3 * SectorSize, HdrVer: 0x00010000,
		MaxBATSize: uint32(maxBlocks), BlockSize: BlockSize}
	copy(h.Cookie[:], "cxsparse")

	batBytes := padded(uint64(maxBlocks) * 4)
	batmapHdrOff := h.TableOffset + batBytes
	bm := batmapHeader{BatmapOffset: batmapHdrOff + SectorSize, BatmapVersion: batmapVersion}
	copy(bm.Cookie[:], "tdbatmap")
	bm.BatmapSize = uint32(padded((uint64(maxBlocks)+7)/8) / SectorSize)
	bm.Checksum = ^uint32(0) // all-zero map
	end := bm.BatmapOffset + uint64(bm.BatmapSize)*SectorSize

	var locData [][]byte
	if parent != nil {
		f.Type = TypeDiff
		h.ParentUUID = parent.ftr.UUID
		st, err := os.Stat(parentPath)
		if err != nil {
			return err
		}
		h.ParentTS = vhdTime(st.ModTime())
		copy(h.ParentName[:], utf16BE(filepath.Base(parentPath)))
		rel, err := relativeTo(path, parentPath)
		if err != nil {
			return err
		}
		for i, code := range []uint32{platMacX, platW2KU, platW2RU} {
			data := encodeLocator(code, rel)
			space := padded(uint64(len(data)))
			// libvhd writes data_space in bytes, not sectors (MICROSOFT_COMPAT).
			h.Loc[i] = locator{Code: code, DataSpace: uint32(space), DataLen: uint32(len(data)), DataOffset: end}
			buf := make([]byte, space)
			copy(buf, data)
			locData = append(locData, buf)
			end += space
		}
	}

	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	w := func(b []byte, off uint64) error {
		_, err := tmp.WriteAt(b, int64(off))
		return err
	}
	fb := f.bytes()
	bat := make([]byte, batBytes)
	for i := range bat {
		bat[i] = 0xFF
	}
	// libvhd fills the BAT's padding with zeros after the last entry.
	for i := uint64(maxBlocks) * 4; i < batBytes; i++ {
		bat[i] = 0
	}
	steps := []struct {
		b   []byte
		off uint64
	}{
		{fb, 0}, {h.bytes(), SectorSize}, {bat, h.TableOffset}, {encode(&bm), batmapHdrOff},
		{make([]byte, uint64(bm.BatmapSize)*SectorSize), bm.BatmapOffset},
	}
	for i, d := range locData {
		steps = append(steps, struct {
			b   []byte
			off uint64
		}{d, h.Loc[i].DataOffset})
	}
	steps = append(steps, struct {
		b   []byte
		off uint64
	}{fb, end})
	for _, s := range steps {
		if err := w(s.b, s.off); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o600); err != nil {
		return err
	}
	return durable.Rename(tmp.Name(), path)
}

// relativeTo is libvhd's relative_path_to: the parent's path seen from the
// child's directory, "./name" for a sibling.
func relativeTo(child, parent string) (string, error) {
	ca, err := filepath.Abs(child)
	if err != nil {
		return "", err
	}
	pa, err := filepath.Abs(parent)
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(filepath.Dir(ca), pa)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(rel, "../") {
		rel = "./" + rel
	}
	return rel, nil
}

func encodeLocator(code uint32, rel string) []byte {
	switch code {
	case platMacX:
		return []byte("file://" + rel)
	default: // W2ku/W2ru: ".\name" in UTF-16LE
		s := strings.TrimPrefix(rel, "./")
		if !strings.HasPrefix(rel, "/") {
			s = ".\\" + s
		}
		return utf16LE(strings.ReplaceAll(s, "/", "\\"))
	}
}

// Open opens a VHD. A footer that is missing at the end of the file (a
// crash while a block was being appended) is recovered from the copy at
// offset 0, and rewritten when the image is opened writable.
func Open(path string, writable bool) (*Image, error) {
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	img := &Image{f: f, path: path, writable: writable, bitmaps: map[uint32][]byte{}}
	if err := img.load(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return img, nil
}

func (i *Image) load() error {
	st, err := i.f.Stat()
	if err != nil {
		return err
	}
	buf := make([]byte, headerSize)
	if _, err := i.f.ReadAt(buf[:footerSize], 0); err != nil {
		return fmt.Errorf("reading footer copy: %w", ErrNotVHD)
	}
	backup, berr := parseFooter(buf)
	primary := footer{}
	perr := errors.New("file too small")
	if st.Size() >= footerSize {
		if _, err := i.f.ReadAt(buf[:footerSize], st.Size()-footerSize); err == nil {
			primary, perr = parseFooter(buf)
		}
	}
	footerLost := false
	switch {
	case perr == nil:
		i.ftr = primary
	case berr == nil:
		i.ftr, footerLost = backup, true
	default:
		return perr
	}
	if i.ftr.Type != TypeDynamic && i.ftr.Type != TypeDiff {
		return fmt.Errorf("disk type %d is not dynamic or differencing: %w", i.ftr.Type, ErrNotVHD)
	}
	if _, err := i.f.ReadAt(buf, int64(i.ftr.DataOffset)); err != nil {
		return fmt.Errorf("reading header: %w", ErrNotVHD)
	}
	if i.hdr, err = parseHeader(buf); err != nil {
		return err
	}
	if err := i.checkLayout(st.Size()); err != nil {
		return err
	}
	raw := make([]byte, uint64(i.hdr.MaxBATSize)*4)
	if _, err := i.f.ReadAt(raw, int64(i.hdr.TableOffset)); err != nil {
		return fmt.Errorf("reading BAT: %w", ErrNotVHD)
	}
	i.bat = make([]uint32, i.hdr.MaxBATSize)
	for k := range i.bat {
		i.bat[k] = binary.BigEndian.Uint32(raw[4*k:])
	}
	if err := i.checkBAT(st.Size()); err != nil {
		return err
	}
	if footerLost && i.writable {
		return i.writeFooterAtEnd()
	}
	return nil
}

// maxLocatorSpace bounds a parent locator's data (libvhd writes at most a
// few sectors; a path is < 4 KiB).
const maxLocatorSpace = 64 << 10

// checkLayout bounds every header and footer field that sizes an
// allocation or places a later read or write, before any is used: the
// checksums only prove the fields were written together, not that they are
// sane (a MaxBATSize of 0xFFFFFFFF asked for 16 GiB; 0 made WriteAt panic).
func (i *Image) checkLayout(size int64) error {
	bad := func(f string, a ...any) error { return fmt.Errorf(f+": %w", append(a, ErrNotVHD)...) }
	fsize := uint64(size)
	h, f := i.hdr, i.ftr
	maxEntries := uint64(MaxSize / BlockSize)
	switch {
	case h.MaxBATSize == 0 || uint64(h.MaxBATSize) > maxEntries:
		return bad("BAT size %d is outside 1..%d entries", h.MaxBATSize, maxEntries)
	case f.CurrSize > uint64(h.MaxBATSize)*BlockSize:
		return bad("virtual size %d is larger than its BAT covers (%d blocks)", f.CurrSize, h.MaxBATSize)
	case f.DataOffset < footerSize || f.DataOffset > fsize || f.DataOffset+headerSize > fsize:
		return bad("header offset %d is outside the file (%d bytes)", f.DataOffset, fsize)
	case h.TableOffset < footerSize || h.TableOffset > fsize || h.TableOffset+uint64(h.MaxBATSize)*4 > fsize:
		return bad("BAT at %d (+%d entries) is outside the file (%d bytes)", h.TableOffset, h.MaxBATSize, fsize)
	}
	for k, l := range h.Loc {
		if l.Code == platNone {
			continue
		}
		space := uint64(l.DataSpace)
		if space < 512 {
			space *= SectorSize
		}
		if uint64(l.DataLen) > space || space > maxLocatorSpace || l.DataOffset < footerSize || l.DataOffset > fsize || l.DataOffset+space > fsize {
			return bad("parent locator %d (offset %d, space %d, length %d) is outside the file (%d bytes)", k, l.DataOffset, l.DataSpace, l.DataLen, fsize)
		}
	}
	return nil
}

// checkBAT: every allocated block (bitmap and data) lies inside the file.
// A block is written before the BAT entry that points at it, so even an
// interrupted allocation never leaves an entry past the end; an entry that
// is must not make the recovered footer land terabytes away.
func (i *Image) checkBAT(size int64) error {
	for b, e := range i.bat {
		if e == unusedBlock {
			continue
		}
		end := (uint64(e) + bitmapSectors + sectorsPerBlk) * SectorSize
		if uint64(e)*SectorSize < footerSize || end > uint64(size) {
			return fmt.Errorf("BAT entry %d (sector %d) points outside the file (%d bytes): %w", b, e, size, ErrNotVHD)
		}
	}
	return nil
}

// Close closes the file.
func (i *Image) Close() error { return i.f.Close() }

// Path is the file the image was opened from.
func (i *Image) Path() string { return i.path }

// VirtualSize is the disk size seen by a guest.
func (i *Image) VirtualSize() int64 { return int64(i.ftr.CurrSize) }

// Info describes the image.
func (i *Image) Info() Info {
	inf := Info{UUID: i.ftr.UUID, Type: int(i.ftr.Type), VirtualSize: int64(i.ftr.CurrSize),
		MaxSize: int64(i.hdr.MaxBATSize) * BlockSize, Hidden: i.ftr.Hidden != 0}
	if i.ftr.Type == TypeDiff {
		inf.ParentUUID = i.hdr.ParentUUID
		inf.ParentName = decodeUTF16(i.hdr.ParentName[:], binary.BigEndian)
		inf.ParentLocator, _ = i.locator()
	}
	return inf
}

// locator returns the parent path stored in the W2ru (else MacX) locator.
func (i *Image) locator() (string, error) {
	for _, want := range []uint32{platW2RU, platMacX} {
		for _, l := range i.hdr.Loc {
			if l.Code != want || l.DataLen == 0 {
				continue
			}
			b := make([]byte, l.DataLen)
			if _, err := i.f.ReadAt(b, int64(l.DataOffset)); err != nil {
				return "", err
			}
			if want == platMacX {
				return strings.TrimPrefix(string(b), "file://"), nil
			}
			s := strings.ReplaceAll(decodeUTF16(b, binary.LittleEndian), "\\", "/")
			return s, nil
		}
	}
	return "", fmt.Errorf("differencing disk without a parent locator: %w", ErrNotVHD)
}

// ParentPath resolves the parent's path (relative locators are relative to
// the child's directory). Empty for a dynamic disk.
func (i *Image) ParentPath() (string, error) {
	if i.ftr.Type != TypeDiff {
		return "", nil
	}
	loc, err := i.locator()
	if err != nil {
		return "", err
	}
	if filepath.IsAbs(loc) {
		return loc, nil
	}
	return filepath.Join(filepath.Dir(i.path), loc), nil
}

// endOfData is libvhd's vhd_end_of_data, in bytes: where the next block or
// the footer goes.
func (i *Image) endOfData() uint64 {
	end := i.ftr.DataOffset + headerSize
	if e := i.hdr.TableOffset + padded(uint64(i.hdr.MaxBATSize)*4); e > end {
		end = e
	}
	// batmap header sector and map
	bmHdr := i.hdr.TableOffset + padded(uint64(i.hdr.MaxBATSize)*4)
	if e := bmHdr + SectorSize + padded((uint64(i.hdr.MaxBATSize)+7)/8); e > end {
		end = e
	}
	for _, l := range i.hdr.Loc {
		if l.Code == platNone {
			continue
		}
		size := uint64(l.DataSpace)
		if size < 512 {
			size *= SectorSize
		}
		if e := l.DataOffset + size; e > end {
			end = e
		}
	}
	for _, b := range i.bat {
		if b == unusedBlock {
			continue
		}
		if e := (uint64(b) + bitmapSectors + sectorsPerBlk) * SectorSize; e > end {
			end = e
		}
	}
	return end
}

func (i *Image) writeFooterAtEnd() error {
	off := i.endOfData()
	if _, err := i.f.WriteAt(i.ftr.bytes(), int64(off)); err != nil {
		return err
	}
	return i.f.Truncate(int64(off) + footerSize)
}

// writeFooters rewrites the footer at the end and its copy at offset 0.
func (i *Image) writeFooters() error {
	if err := i.writeFooterAtEnd(); err != nil {
		return err
	}
	_, err := i.f.WriteAt(i.ftr.bytes(), 0)
	return err
}

// SetHidden sets tapdisk's hidden flag (vhd-util set -f hidden), which
// marks base copies that no VDI uses directly.
func (i *Image) SetHidden(hidden bool) error {
	i.ftr.Hidden = 0
	if hidden {
		i.ftr.Hidden = 1
	}
	return i.writeFooters()
}

// Resize grows the virtual size within the preallocated BAT, like
// `vhd-util resize -f`. Shrinking is refused.
func (i *Image) Resize(size int64) error {
	newSize := roundBlocks(size) * BlockSize
	if newSize < i.ftr.CurrSize {
		return fmt.Errorf("%s from %d to %d bytes: %w", i.path, i.ftr.CurrSize, size, ErrShrink)
	}
	if newSize/BlockSize > uint64(i.hdr.MaxBATSize) {
		return fmt.Errorf("%s to %d bytes: the image was created for at most %d bytes: %w",
			i.path, size, uint64(i.hdr.MaxBATSize)*BlockSize, ErrTooLarge)
	}
	i.ftr.CurrSize = newSize
	i.ftr.Geometry = chs(newSize)
	if err := i.writeFooters(); err != nil {
		return err
	}
	return i.f.Sync()
}

// SetParent points a differencing disk at a new parent (vhd-util modify
// -p): parent uuid, name, timestamp and the three locators, which keep
// their place and size in the file.
func (i *Image) SetParent(parentPath string) error {
	if i.ftr.Type != TypeDiff {
		return fmt.Errorf("%s is not a differencing disk: %w", i.path, ErrNotVHD)
	}
	p, err := Open(parentPath, false)
	if err != nil {
		return err
	}
	puuid := p.ftr.UUID
	p.Close()
	st, err := os.Stat(parentPath)
	if err != nil {
		return err
	}
	rel, err := relativeTo(i.path, parentPath)
	if err != nil {
		return err
	}
	h := i.hdr
	h.ParentUUID = puuid
	h.ParentTS = vhdTime(st.ModTime())
	h.ParentName = [512]byte{}
	copy(h.ParentName[:], utf16BE(filepath.Base(parentPath)))
	for k := range h.Loc {
		l := &h.Loc[k]
		if l.Code != platMacX && l.Code != platW2KU && l.Code != platW2RU {
			continue
		}
		data := encodeLocator(l.Code, rel)
		space := uint64(l.DataSpace)
		if space < 512 {
			space *= SectorSize
		}
		if uint64(len(data)) > space {
			return fmt.Errorf("%s: new parent path %q does not fit the locator", i.path, rel)
		}
		buf := make([]byte, space)
		copy(buf, data)
		if _, err := i.f.WriteAt(buf, int64(l.DataOffset)); err != nil {
			return err
		}
		l.DataLen = uint32(len(data))
	}
	if _, err := i.f.WriteAt(h.bytes(), int64(i.ftr.DataOffset)); err != nil {
		return err
	}
	i.hdr = h
	return i.f.Sync()
}

// Sync flushes the file.
func (i *Image) Sync() error { return i.f.Sync() }

// Blocks is the number of 2 MiB blocks the virtual size covers.
func (i *Image) Blocks() uint32 { return uint32(roundBlocks(int64(i.ftr.CurrSize))) }

// BlockAllocated reports whether this file holds block b.
func (i *Image) BlockAllocated(b uint32) bool {
	return int(b) < len(i.bat) && i.bat[b] != unusedBlock
}

func (i *Image) bitmap(b uint32) ([]byte, error) {
	if bm, ok := i.bitmaps[b]; ok {
		return bm, nil
	}
	bm := make([]byte, SectorSize)
	if _, err := i.f.ReadAt(bm, int64(i.bat[b])*SectorSize); err != nil {
		return nil, fmt.Errorf("reading bitmap of block %d: %w", b, err)
	}
	i.bitmaps[b] = bm
	return bm, nil
}

func bit(bm []byte, n uint32) bool { return bm[n>>3]&(0x80>>(n&7)) != 0 }
func setBit(bm []byte, n uint32)   { bm[n>>3] |= 0x80 >> (n & 7) }

// SectorPresent reports whether this file holds the given sector (not its
// parents).
func (i *Image) SectorPresent(sector int64) (bool, error) {
	b := uint32(sector / sectorsPerBlk)
	if !i.BlockAllocated(b) {
		return false, nil
	}
	bm, err := i.bitmap(b)
	if err != nil {
		return false, err
	}
	return bit(bm, uint32(sector%sectorsPerBlk)), nil
}

// ReadBlock returns block b's sector bitmap and data as stored in this
// file; ok is false when the block is not allocated here.
func (i *Image) ReadBlock(b uint32) (bm, data []byte, ok bool, err error) {
	if !i.BlockAllocated(b) {
		return nil, nil, false, nil
	}
	m, err := i.bitmap(b)
	if err != nil {
		return nil, nil, false, err
	}
	data = make([]byte, BlockSize)
	if _, err := i.f.ReadAt(data, (int64(i.bat[b])+bitmapSectors)*SectorSize); err != nil {
		return nil, nil, false, err
	}
	return append([]byte(nil), m...), data, true, nil
}

// allocate appends block b, libvhd-style: the bitmap sector is placed so
// that the data starts on a 4 KiB boundary. Order matters for crashes: the
// zeroed block and a new footer are written before the BAT entry points at
// them, so an interrupted allocation only leaks space.
func (i *Image) allocate(b uint32) error {
	off := i.endOfData()
	sec := off / SectorSize
	const spp = 8
	if (sec+bitmapSectors)%spp != 0 {
		sec += spp - (sec+bitmapSectors)%spp
	}
	if _, err := i.f.WriteAt(make([]byte, (sec-off/SectorSize+bitmapSectors+sectorsPerBlk)*SectorSize), int64(off)); err != nil {
		return err
	}
	end := (sec + bitmapSectors + sectorsPerBlk) * SectorSize
	if _, err := i.f.WriteAt(i.ftr.bytes(), int64(end)); err != nil {
		return err
	}
	if err := i.f.Sync(); err != nil {
		return err
	}
	var e [4]byte
	binary.BigEndian.PutUint32(e[:], uint32(sec))
	if _, err := i.f.WriteAt(e[:], int64(i.hdr.TableOffset)+int64(b)*4); err != nil {
		return err
	}
	i.bat[b] = uint32(sec)
	i.bitmaps[b] = make([]byte, SectorSize)
	return nil
}

// WriteAt writes sector-aligned data at off into this file (allocating
// blocks and setting bitmap bits), as tapdisk would for a guest write.
func (i *Image) WriteAt(p []byte, off int64) (int, error) {
	if off%SectorSize != 0 || len(p)%SectorSize != 0 {
		return 0, fmt.Errorf("unaligned write at %d (+%d)", off, len(p))
	}
	if off+int64(len(p)) > int64(i.ftr.CurrSize) {
		return 0, ErrOutOfRange
	}
	done := 0
	for done < len(p) {
		sector := (off + int64(done)) / SectorSize
		b := uint32(sector / sectorsPerBlk)
		first := uint32(sector % sectorsPerBlk)
		n := uint32(len(p)-done) / SectorSize
		if first+n > sectorsPerBlk {
			n = sectorsPerBlk - first
		}
		m := make([]byte, SectorSize)
		for s := first; s < first+n; s++ {
			setBit(m, s)
		}
		if err := i.mergeBlock(b, m, p[done:done+int(n)*SectorSize], first); err != nil {
			return done, err
		}
		done += int(n) * SectorSize
	}
	return done, nil
}

// mergeBlock writes the sectors of data (starting at sector first of block
// b) whose bits are set in m, then ORs m into the block's bitmap. Data goes
// before the bitmap, so a crash never exposes unwritten sectors.
func (i *Image) mergeBlock(b uint32, m, data []byte, first uint32) error {
	if !i.BlockAllocated(b) {
		if err := i.allocate(b); err != nil {
			return err
		}
	}
	base := (int64(i.bat[b]) + bitmapSectors) * SectorSize
	nsec := uint32(len(data) / SectorSize)
	for s := uint32(0); s < nsec; {
		if !bit(m, first+s) {
			s++
			continue
		}
		e := s
		for e < nsec && bit(m, first+e) {
			e++
		}
		if _, err := i.f.WriteAt(data[s*SectorSize:e*SectorSize], base+int64(first+s)*SectorSize); err != nil {
			return err
		}
		s = e
	}
	bm, err := i.bitmap(b)
	if err != nil {
		return err
	}
	for k := range bm {
		bm[k] |= m[k]
	}
	_, err = i.f.WriteAt(bm, int64(i.bat[b])*SectorSize)
	return err
}

// MergeBlock copies the sectors of a whole block that bm marks present
// into this file: the primitive of coalescing a child into its parent.
// Rewriting the same data is harmless, so an interrupted coalesce can
// simply be run again.
func (i *Image) MergeBlock(b uint32, bm, data []byte) error {
	if int(b) >= len(i.bat) {
		return ErrOutOfRange
	}
	return i.mergeBlock(b, bm, data, 0)
}

// ReadOwnAt reads from this file only; sectors it does not hold read as
// zeros and are reported false in present (one entry per sector).
func (i *Image) ReadOwnAt(p []byte, off int64) (present []bool, err error) {
	if off%SectorSize != 0 || len(p)%SectorSize != 0 {
		return nil, fmt.Errorf("unaligned read at %d (+%d)", off, len(p))
	}
	present = make([]bool, len(p)/SectorSize)
	for k := range present {
		sector := off/SectorSize + int64(k)
		dst := p[k*SectorSize : (k+1)*SectorSize]
		ok, err := i.SectorPresent(sector)
		if err != nil {
			return nil, err
		}
		if !ok {
			clear(dst)
			continue
		}
		b := uint32(sector / sectorsPerBlk)
		pos := (int64(i.bat[b])+bitmapSectors)*SectorSize + (sector%sectorsPerBlk)*SectorSize
		if _, err := i.f.ReadAt(dst, pos); err != nil && err != io.EOF {
			return nil, err
		}
		present[k] = true
	}
	return present, nil
}

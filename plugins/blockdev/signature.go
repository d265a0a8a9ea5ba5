// Package blockdev answers "does this device already hold something?" and
// erases what it found, so that SR.create never formats over a disk that
// carries a filesystem, a partition table, LUKS, LVM, swap or RAID unless
// the administrator asked for it explicitly (Ignition's rule).
//
// Probing reads magic bytes in Go, so it works the same on dom0's old
// util-linux, on plain image files in tests and on block devices; when a
// run.Runner is given, `blkid -p` adds whatever our table does not know.
package blockdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/luksext/luksext/plugins/run"
)

// ErrSignaturePresent is wrapped by CheckUnused when the device holds data.
var ErrSignaturePresent = errors.New("device is not empty")

// ErrDeviceNotFound is wrapped when the path does not exist.
var ErrDeviceNotFound = errors.New("device not found")

// Signature is one thing found on the device.
type Signature struct {
	// Type is blkid's name for it: ext4, xfs, btrfs, crypto_LUKS,
	// LVM2_member, swap, linux_raid_member, gpt, dos, vfat, ntfs, ...
	Type  string
	Label string
	// Offset of the magic in bytes, -1 when reported by blkid only.
	Offset int64
}

// Describe is the administrator-facing phrase, e.g. "an ext4 filesystem
// (label 'data')".
func (s Signature) Describe() string {
	var what string
	switch s.Type {
	case "gpt":
		what = "a GPT partition table"
	case "dos":
		what = "an MBR (DOS) partition table or boot sector"
	case "crypto_LUKS":
		what = "a LUKS header"
	case "LVM2_member":
		what = "an LVM physical volume"
	case "swap":
		what = "a swap area"
	case "linux_raid_member":
		what = "a Linux software RAID (md) member"
	default:
		what = "a filesystem"
		if s.Type != "" {
			what = article(s.Type) + " " + s.Type + " filesystem"
		}
	}
	if s.Label != "" {
		what += fmt.Sprintf(" (label '%s')", s.Label)
	}
	return what
}

func article(w string) string {
	if w != "" && strings.ContainsRune("aeiouAEIOU", rune(w[0])) {
		return "an"
	}
	return "a"
}

// Prober finds signatures. Run is optional: with it, blkid's findings are
// merged into ours.
type Prober struct {
	Run run.Runner
}

// Probe lists the signatures on path, most significant first.
func (p Prober) Probe(ctx context.Context, path string) ([]Signature, error) {
	sigs, err := ProbeMagic(path)
	if err != nil {
		return nil, err
	}
	if p.Run == nil {
		return sigs, nil
	}
	res, err := p.Run.Run(ctx, run.Cmd{Tool: "blkid", Args: []string{"-p", "-o", "export", path}})
	// blkid exits 2 when it finds nothing; a missing blkid is not fatal:
	// our own table already covers what SR.create must refuse.
	if err != nil {
		return sigs, nil
	}
	kv := map[string]string{}
	for _, line := range strings.Split(string(res.Stdout), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			kv[k] = v
		}
	}
	for _, key := range []string{"TYPE", "PTTYPE"} {
		t := kv[key]
		if t == "" || hasType(sigs, t) {
			continue
		}
		s := Signature{Type: t, Offset: -1}
		if key == "TYPE" {
			s.Label = kv["LABEL"]
		}
		sigs = append(sigs, s)
	}
	return sigs, nil
}

func hasType(sigs []Signature, t string) bool {
	for _, s := range sigs {
		if s.Type == t {
			return true
		}
	}
	return false
}

// CheckUnused returns nil when path holds no signature or force is set;
// otherwise an error wrapping ErrSignaturePresent that says what was found.
func (p Prober) CheckUnused(ctx context.Context, path string, force bool) ([]Signature, error) {
	sigs, err := p.Probe(ctx, path)
	if err != nil {
		return nil, err
	}
	if len(sigs) == 0 || force {
		return sigs, nil
	}
	var found []string
	for _, s := range sigs {
		found = append(found, s.Describe())
	}
	return sigs, fmt.Errorf("device %s holds %s; pass force=true to erase it: %w",
		path, strings.Join(found, " and "), ErrSignaturePresent)
}

// ProbeMagic reads the well-known magic numbers.
func ProbeMagic(path string) ([]Signature, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", path, ErrDeviceNotFound)
		}
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("sizing %s: %w", path, err)
	}
	r := reader{f: f, size: size}
	var sigs []Signature
	add := func(s Signature) { sigs = append(sigs, s) }

	switch {
	case r.is(0, "LUKS\xba\xbe"):
		add(Signature{Type: "crypto_LUKS", Offset: 0})
	case r.is(0, "XFSB"):
		add(Signature{Type: "xfs", Label: r.str(0x6c, 12), Offset: 0})
	case r.is(0x10040, "_BHRfS_M"):
		add(Signature{Type: "btrfs", Label: r.str(0x1012b, 256), Offset: 0x10040})
	case r.is(0x438, "\x53\xef"):
		add(Signature{Type: extType(r), Label: r.str(0x478, 16), Offset: 0x438})
	case r.is(3, "NTFS    "):
		add(Signature{Type: "ntfs", Offset: 3})
	case r.is(0x36, "FAT1") || r.is(0x52, "FAT32   "):
		add(Signature{Type: "vfat", Offset: 0x36})
	case r.is(0x8001, "CD001"):
		add(Signature{Type: "iso9660", Offset: 0x8001})
	case r.is(0, "hsqs"):
		add(Signature{Type: "squashfs", Offset: 0})
	}
	// A damaged primary LUKS2 header still leaves a usable secondary copy.
	if !hasType(sigs, "crypto_LUKS") {
		for _, off := range []int64{0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000} {
			if r.is(off, "SKUL\xba\xbe") {
				add(Signature{Type: "crypto_LUKS", Offset: off})
				break
			}
		}
	}
	for sector := int64(0); sector < 4; sector++ {
		if off := sector * 512; r.is(off, "LABELONE") && r.is(off+0x18, "LVM2 001") {
			add(Signature{Type: "LVM2_member", Offset: off})
			break
		}
	}
	for _, page := range []int64{4096, 8192, 16384, 65536} {
		if r.is(page-10, "SWAPSPACE2") || r.is(page-10, "SWAP-SPACE") {
			add(Signature{Type: "swap", Label: r.str(0x41c, 16), Offset: page - 10})
			break
		}
	}
	const mdMagic = "\xfc\x4e\x2b\xa9" // 0xa92b4efc little-endian
	mdOffsets := []int64{0, 4096}      // v1.1, v1.2
	if size >= 128<<10 {
		mdOffsets = append(mdOffsets, (size&^(64<<10-1))-64<<10) // v0.90
	}
	if size >= 8192 {
		mdOffsets = append(mdOffsets, ((size/512-16)&^7)*512) // v1.0
	}
	for _, off := range mdOffsets {
		if r.is(off, mdMagic) {
			add(Signature{Type: "linux_raid_member", Offset: off})
			break
		}
	}
	switch {
	case r.is(512, "EFI PART"):
		add(Signature{Type: "gpt", Offset: 512})
	case r.is(4096, "EFI PART"):
		add(Signature{Type: "gpt", Offset: 4096})
	case r.is(510, "\x55\xaa") && len(sigs) == 0:
		// FAT and NTFS boot sectors carry 0x55AA too; only report a DOS
		// table when nothing more specific explains the marker.
		add(Signature{Type: "dos", Offset: 510})
	}
	return sigs, nil
}

// extType tells ext2/3/4 apart the way blkid does: by feature flags.
func extType(r reader) string {
	compat := r.u32(0x45c)
	incompat := r.u32(0x460)
	const (
		hasJournal  = 0x4
		extents     = 0x40
		sixtyFour   = 0x80
		flexBG      = 0x200
		journalDevI = 0x8
	)
	switch {
	case incompat&journalDevI != 0:
		return "jbd"
	case incompat&(extents|sixtyFour|flexBG) != 0:
		return "ext4"
	case compat&hasJournal != 0:
		return "ext3"
	}
	return "ext2"
}

type reader struct {
	f    *os.File
	size int64
}

func (r reader) bytes(off int64, n int) []byte {
	if off < 0 || off+int64(n) > r.size {
		return nil
	}
	b := make([]byte, n)
	if _, err := r.f.ReadAt(b, off); err != nil {
		return nil
	}
	return b
}

func (r reader) is(off int64, magic string) bool {
	return bytes.Equal(r.bytes(off, len(magic)), []byte(magic))
}

func (r reader) str(off int64, n int) string {
	b := r.bytes(off, n)
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return strings.TrimSpace(string(b))
}

func (r reader) u32(off int64) uint32 {
	b := r.bytes(off, 4)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(b)
}

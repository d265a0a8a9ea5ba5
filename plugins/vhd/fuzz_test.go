package vhd

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// fuzzReader hands out the fuzzer's bytes as fields; past the end it
// gives zeros.
type fuzzReader struct{ b []byte }

func (r *fuzzReader) u8() uint8 {
	if len(r.b) == 0 {
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *fuzzReader) u32() uint32 {
	var x [4]byte
	for i := range x {
		x[i] = r.u8()
	}
	return binary.BigEndian.Uint32(x[:])
}

func (r *fuzzReader) u64() uint64 { return uint64(r.u32())<<32 | uint64(r.u32()) }

// mutate applies up to 8 field changes chosen by the input to a parsed
// footer, header and BAT; craft then writes them with valid checksums, so
// the fuzzer explores the values behind the checksums rather than the
// checksums.
func mutate(r *fuzzReader, f *footer, h *header, bat []uint32) {
	for n := r.u8() % 9; n > 0; n-- {
		switch r.u8() % 14 {
		case 0:
			h.MaxBATSize = r.u32()
		case 1:
			h.TableOffset = r.u64() % (1 << 41)
		case 2:
			f.DataOffset = r.u64() % (1 << 41)
		case 3:
			f.CurrSize = r.u64() % (4 << 40)
		case 4:
			if len(bat) > 0 {
				bat[int(r.u32())%len(bat)] = r.u32()
			}
		case 5:
			l := &h.Loc[r.u8()%8]
			l.Code = []uint32{platNone, platMacX, platW2KU, platW2RU}[r.u8()%4]
		case 6:
			h.Loc[r.u8()%8].DataSpace = r.u32()
		case 7:
			h.Loc[r.u8()%8].DataLen = r.u32()
		case 8:
			h.Loc[r.u8()%8].DataOffset = r.u64() % (1 << 41)
		case 9:
			f.Type = []uint32{TypeDynamic, TypeDiff, TypeFixed, r.u32()}[r.u8()%4]
		case 10:
			h.ParentUUID[r.u8()%16] = r.u8()
		case 11:
			f.Hidden = r.u8()
		case 12:
			h.ParentName[r.u8()%64] = r.u8()
		case 13:
			if len(bat) > 0 {
				bat[int(r.u32())%len(bat)] = unusedBlock
			}
		}
	}
}

// FuzzVHD opens, reads, resizes and coalesces a two-image chain whose
// child (or parent) carries fuzzed metadata with valid checksums. Nothing
// may panic, allocate more than the format allows, or grow a file by more
// than the blocks an operation writes. The seed corpus (below, and
// testdata/fuzz/FuzzVHD) runs in every `go test`; `make fuzz` explores.
func FuzzVHD(f *testing.F) {
	seed := func(vals ...any) []byte {
		var out []byte
		for _, v := range vals {
			switch x := v.(type) {
			case int:
				out = append(out, byte(x))
			case uint32:
				out = binary.BigEndian.AppendUint32(out, x)
			case uint64:
				out = binary.BigEndian.AppendUint64(out, x)
			}
		}
		return out
	}
	f.Add(seed(0, 0))                                        // untouched chain
	f.Add(seed(0, 1, 0, uint32(0xFFFFFFFF)))                 // item 5: MaxBATSize 0xFFFFFFFF
	f.Add(seed(1, 1, 0, uint32(0)))                          // item 12: MaxBATSize 0
	f.Add(seed(2, 1, 4, uint32(0), uint32(0xFFFFFF00)))      // item 11: BAT[0] far away, footer lost
	f.Add(seed(0, 2, 3, uint64(3<<40), 7, 0, uint32(1<<31))) // size past the BAT, huge locator
	f.Add(seed(0, 3, 5, 0, 1, 6, 0, uint32(0xFFFFFFFF), 8, 0, uint64(1<<40)))
	f.Add(seed(1, 2, 9, 0, 3, 10, 0, 9))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &fuzzReader{b: data}
		dir := t.TempDir()
		parent := filepath.Join(dir, "p.vhd")
		child := filepath.Join(dir, "c.vhd")
		if err := Create(parent, 8*mib, CreateOptions{MaxSize: 32 * mib}); err != nil {
			t.Fatal(err)
		}
		pimg, err := Open(parent, true)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pimg.WriteAt(make([]byte, 8192), 2*mib); err != nil {
			t.Fatal(err)
		}
		pimg.Close()
		if err := Snapshot(child, parent, CreateOptions{MaxSize: 32 * mib}); err != nil {
			t.Fatal(err)
		}
		cimg, err := Open(child, true)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cimg.WriteAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		cimg.Close()

		mode := r.u8()
		target := child
		if mode&1 == 1 {
			target = parent
		}
		drop := mode&2 == 2
		craft(t, target, 0, drop, func(f *footer, h *header, bat []uint32) { mutate(r, f, h, bat) })
		sizes := map[string]int64{}
		for _, p := range []string{parent, child} {
			st, _ := os.Stat(p)
			sizes[p] = st.Size()
		}

		if c, err := OpenChain(child); err == nil {
			buf := make([]byte, 64<<10)
			for _, off := range []int64{0, 2 * mib, c.VirtualSize() - int64(len(buf))} {
				if off >= 0 {
					_, _ = c.ReadAt(buf, off)
				}
			}
			c.Close()
		}
		if img, err := Open(child, true); err == nil {
			_ = img.Resize(int64(r.u32()%64) * mib)
			_, _ = img.WriteAt(make([]byte, 512), int64(r.u32()%16)*SectorSize)
			img.Close()
		}
		// coalesce child into parent, as plugins/image does
		if c, err := Open(child, false); err == nil {
			if p, err := Open(parent, true); err == nil {
				if c.VirtualSize() > p.VirtualSize() {
					_ = p.Resize(c.VirtualSize())
				}
				for b := uint32(0); b < c.Blocks() && b < 64; b++ {
					if bm, d, ok, err := c.ReadBlock(b); err == nil && ok {
						_ = p.MergeBlock(b, bm, d)
					}
				}
				p.Close()
			}
			c.Close()
		}
		for _, p := range []string{parent, child} {
			st, _ := os.Stat(p)
			// each operation above writes at most a few blocks
			if grow := st.Size() - sizes[p]; grow > 40*(BlockSize+4096) {
				t.Fatalf("%s grew by %d bytes", filepath.Base(p), grow)
			}
		}
	})
}

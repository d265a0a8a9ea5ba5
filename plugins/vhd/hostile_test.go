package vhd

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// craft rewrites the metadata of the VHD at p with valid checksums: edit
// changes the footer and header; the footer is written at offset 0 and,
// unless dropFooter, at the end of a file of fileSize bytes (0: as is).
func craft(t testing.TB, p string, fileSize int64, dropFooter bool, edit func(*footer, *header, []uint32)) {
	t.Helper()
	img, err := Open(p, false)
	require.NoError(t, err)
	f, h := img.ftr, img.hdr
	bat := append([]uint32(nil), img.bat...)
	img.Close()
	edit(&f, &h, bat)
	file, err := os.OpenFile(p, os.O_RDWR, 0)
	require.NoError(t, err)
	defer file.Close()
	_, err = file.WriteAt(h.bytes(), int64(img.ftr.DataOffset))
	require.NoError(t, err)
	var raw bytes.Buffer
	require.NoError(t, binary.Write(&raw, binary.BigEndian, bat))
	_, err = file.WriteAt(raw.Bytes(), int64(img.hdr.TableOffset))
	require.NoError(t, err)
	_, err = file.WriteAt(f.bytes(), 0)
	require.NoError(t, err)
	st, err := file.Stat()
	require.NoError(t, err)
	size := st.Size()
	if fileSize != 0 {
		size = fileSize
	}
	if dropFooter {
		require.NoError(t, file.Truncate(size-footerSize))
		return
	}
	require.NoError(t, file.Truncate(size))
	_, err = file.WriteAt(f.bytes(), size-footerSize)
	require.NoError(t, err)
}

// Issue 13 items 5, 11, 12: header fields with good checksums but insane
// values are refused as ErrNotVHD naming the file, before they size an
// allocation, place a write or panic.
func TestHostileVHDMetadataIsRefused(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name       string
		fileSize   int64
		dropFooter bool
		edit       func(*footer, *header, []uint32)
	}{
		// item 5: a 16 GiB BAT read into memory (OOM in dom0); the file is
		// sparse and large enough that every read would succeed
		{"MaxBATSize 0xFFFFFFFF", 17 << 30, false, func(_ *footer, h *header, _ []uint32) { h.MaxBATSize = 0xFFFFFFFF }},
		// item 12: WriteAt indexed an empty BAT
		{"MaxBATSize 0", 0, false, func(_ *footer, h *header, _ []uint32) { h.MaxBATSize = 0 }},
		// item 11: lost primary footer, BAT[0] far past the end: the
		// recovered footer went to ~2 TiB
		{"BAT entry past the end, footer lost", 0, true, func(_ *footer, _ *header, bat []uint32) { bat[0] = 0xFFFFFF00 }},
		{"BAT entry past the end", 0, false, func(_ *footer, _ *header, bat []uint32) { bat[1] = 0x00FFFF00 }},
		{"virtual size beyond the BAT", 0, false, func(f *footer, h *header, _ []uint32) { f.CurrSize = uint64(h.MaxBATSize+1) * BlockSize }},
		{"header offset past the end", 0, false, func(f *footer, _ *header, _ []uint32) { f.DataOffset = 1 << 40 }},
		{"BAT offset past the end", 0, false, func(_ *footer, h *header, _ []uint32) { h.TableOffset = 1 << 40 }},
		{"locator of 4 GiB", 0, false, func(_ *footer, h *header, _ []uint32) {
			h.Loc[0] = locator{Code: platMacX, DataSpace: 0xFFFFFFFF, DataLen: 0xFFFFFFFF, DataOffset: 1536}
		}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, string(rune('a'+i))+".vhd")
			require.NoError(t, Create(p, 8*mib, CreateOptions{MaxSize: 64 * mib}))
			img, err := Open(p, true)
			require.NoError(t, err)
			_, err = img.WriteAt(make([]byte, 4096), 0)
			require.NoError(t, err)
			img.Close()
			craft(t, p, c.fileSize, c.dropFooter, c.edit)
			before, _ := os.Stat(p)

			img, err = Open(p, true)
			if err == nil {
				// what the old code then did: resize, write
				rerr := img.Resize(16 * mib)
				_, werr := img.WriteAt(make([]byte, 512), 0)
				img.Close()
				t.Fatalf("opened a hostile VHD (resize: %v, write: %v)", rerr, werr)
			}
			assert.ErrorIs(t, err, ErrNotVHD)
			assert.Contains(t, err.Error(), p, "the error names the file")
			after, _ := os.Stat(p)
			assert.Equal(t, before.Size(), after.Size(), "nothing written")
			_, err = OpenChain(p)
			assert.ErrorIs(t, err, ErrNotVHD)
		})
	}
}

package vhd

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// patchFooters rewrites both footer copies of path with change applied to
// the raw bytes, the checksum computed first (over the unchanged bytes)
// when sumBefore, else after: the former is what early td-util left.
func patchFooters(t *testing.T, path string, creatorVer uint32, sumBefore bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	for _, off := range []int64{0, st.Size() - footerSize} {
		b := make([]byte, footerSize)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		binary.BigEndian.PutUint32(b[32:], creatorVer) // crtr_ver (after cookie, features, version, data offset, timestamp, crtr_app)
		b[footerHiddenOff] = 0
		sum := func() {
			binary.BigEndian.PutUint32(b[footerChecksumOff:], checksum(b, footerChecksumOff, footerChecksumOff+4))
		}
		if sumBefore {
			sum()
			b[footerHiddenOff] = 1
		} else {
			b[footerHiddenOff] = 1
			sum()
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

// A footer whose checksum leaves out the hidden byte opens when libvhd
// would open it (creator tap 0.1 or 1.1) and is refused otherwise.
func TestHiddenChecksumQuirkOfOldTdUtil(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ver       uint32
		sumBefore bool
		ok        bool
	}{
		{"tap 1.1, checksum without hidden", 0x00010001, true, true},
		{"tap 0.1, checksum without hidden", 0x00000001, true, true},
		{"tap 1.3, checksum without hidden", 0x00010003, true, false},
		{"tap 1.3, right checksum", 0x00010003, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "a.vhd")
			if err := Create(p, 4<<20, CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			patchFooters(t, p, tc.ver, tc.sumBefore)
			img, err := Open(p, false)
			if !tc.ok {
				if !errors.Is(err, ErrNotVHD) {
					t.Fatalf("opened a footer with a bad checksum (err %v)", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if !img.Info().Hidden {
				t.Fatal("hidden flag not read")
			}
		})
	}
}

// A VHD with 4 MiB blocks is refused with ErrBlockSize (and ErrNotVHD).
func TestOtherBlockSizeIsNamed(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.vhd")
	if err := Create(p, 4<<20, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, headerSize)
	if _, err := f.ReadAt(b, footerSize); err != nil { // header right after the footer copy
		t.Fatal(err)
	}
	binary.BigEndian.PutUint32(b[32:], 4<<20) // block_size
	binary.BigEndian.PutUint32(b[headerChecksumOff:], checksum(b, headerChecksumOff, headerChecksumOff+4))
	if _, err := f.WriteAt(b, footerSize); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, err = Open(p, false)
	if !errors.Is(err, ErrBlockSize) || !errors.Is(err, ErrNotVHD) {
		t.Fatalf("err = %v, want ErrBlockSize", err)
	}
}

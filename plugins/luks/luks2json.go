package luks

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Writing LUKS2 tokens without `cryptsetup token import`.
//
// cryptsetup 2.0.3 (CentOS 7.6+ dom0) can read arbitrary tokens but has no
// CLI to write them (token import arrived in 2.0.4), and the plugin is a
// static binary without libcryptsetup. So the JSON area is rewritten here,
// following what libcryptsetup itself does in LUKS2_disk_hdr_write: the same
// JSON goes into both header copies, each copy keeps its own binary header
// (magic, offset, salt), the sequence id is raised by one, and each copy's
// sha256 checksum covers its binary header (checksum field zeroed) plus its
// whole JSON area. cryptsetup token export / luksDump / clevis luks list
// reading the result back is what the tests check.

// updateTokens applies change to the token map and writes the new JSON
// into both header copies. It takes an exclusive flock on the device, as
// libcryptsetup does for metadata writes on files and block devices.
func updateTokens(path string, change func(h *header, tokens map[string]json.RawMessage) error) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening %s for writing: %w", path, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("locking %s: %w", path, err)
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN) // error ignored: the lock is released on close anyway

	h, err := readHeaderFrom(f, path)
	if err != nil {
		return err
	}
	if h.version != 2 {
		return fmt.Errorf("%s is LUKS%d: tokens need LUKS2: %w", path, h.version, ErrNotSupported)
	}
	tokens := map[string]json.RawMessage{}
	if raw, ok := h.meta["tokens"]; ok {
		if err := json.Unmarshal(raw, &tokens); err != nil {
			return fmt.Errorf("%s: LUKS2 tokens are unreadable: %w", path, err)
		}
	}
	if err := change(h, tokens); err != nil {
		return err
	}
	encTokens, err := json.Marshal(tokens)
	if err != nil {
		return err
	}
	meta := map[string]json.RawMessage{}
	for k, v := range h.meta {
		meta[k] = v
	}
	meta["tokens"] = encTokens
	js, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	return writeLUKS2JSON(f, h, js)
}

func writeLUKS2JSON(f *os.File, h *header, js []byte) error {
	size := int64(h.v2.bin.HdrSize)
	areaLen := size - luks2BinarySize
	// The area must keep a terminating NUL (cryptsetup reads it as a C string).
	if int64(len(js)) >= areaLen {
		return fmt.Errorf("%s: the tokens need %d bytes but the LUKS2 metadata area holds %d: %w",
			f.Name(), len(js), areaLen-1, ErrNoSpace)
	}
	seq := h.v2.bin.SeqID
	for _, c := range h.copies {
		seq = max(seq, c.bin.SeqID)
	}
	seq++

	// Rebuild both copies from the newest one: if a copy was damaged we
	// repair it, as cryptsetup would on its next write.
	targets := []struct {
		off   int64
		magic []byte
	}{{0, luksMagic}, {size, luks2SecondMagic}}
	for _, t := range targets {
		bin := h.v2.bin
		for _, c := range h.copies {
			if c.offset == t.off {
				bin = c.bin // keep this copy's own salt
			}
		}
		copy(bin.Magic[:], t.magic)
		bin.HdrOffset = uint64(t.off)
		bin.SeqID = seq
		bin.Checksum = [64]byte{}
		var buf bytes.Buffer
		if err := binary.Write(&buf, binary.BigEndian, &bin); err != nil {
			return err
		}
		area := make([]byte, size)
		copy(area, buf.Bytes())
		copy(area[luks2BinarySize:], js)
		sum := sha256.Sum256(area)
		copy(area[checksumOffset:], sum[:])
		if _, err := f.WriteAt(area, t.off); err != nil {
			return fmt.Errorf("writing LUKS2 header copy at %d on %s: %w", t.off, f.Name(), err)
		}
		// Flush the first copy before touching the second, so that a crash
		// leaves at least one consistent copy (the newer seqid wins).
		if err := f.Sync(); err != nil {
			return fmt.Errorf("syncing %s: %w", f.Name(), err)
		}
	}
	return nil
}

// freeTokenID returns the lowest unused LUKS2 token id.
func freeTokenID(tokens map[string]json.RawMessage) (int, error) {
	const luks2TokensMax = 32
	for i := 0; i < luks2TokensMax; i++ {
		if _, used := tokens[strconv.Itoa(i)]; !used {
			return i, nil
		}
	}
	return 0, fmt.Errorf("all %d LUKS2 token ids are used: %w", luks2TokensMax, ErrNoSpace)
}

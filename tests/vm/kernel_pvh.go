package vm

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"

	"golang.org/x/sys/unix"
)

// Under TCG, the kernel decompressing itself (xz, ~66 MB for Debian's) costs
// 5-25 s of every boot. QEMU can instead load an uncompressed vmlinux
// through its PVH entry point, so the harness unpacks the bzImage once per
// process into an anonymous file (O_TMPFILE: nothing to clean up, no fixed
// path) that each QEMU opens as /proc/self/fd/3.

var pvhOnce struct {
	sync.Once
	file *os.File
	err  error
}

// pvhKernel returns the unpacked kernel of k, or an error when it cannot be
// made (then the caller boots the bzImage as it is).
func pvhKernel(k Kernel) (*os.File, error) {
	pvhOnce.Do(func() { pvhOnce.file, pvhOnce.err = unpackKernel(k.Image) })
	return pvhOnce.file, pvhOnce.err
}

func unpackKernel(image string) (*os.File, error) {
	bz, err := os.ReadFile(image)
	if err != nil {
		return nil, err
	}
	payload, err := bzImagePayload(bz)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Open(os.TempDir(), unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("anonymous file for the kernel: %w", err)
	}
	f := os.NewFile(uintptr(fd), "vmlinux")
	if err := decompressKernel(payload, f); err != nil {
		f.Close()
		return nil, err
	}
	if err := checkPVH(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// bzImagePayload returns the compressed kernel inside a bzImage, located
// by the boot protocol's setup header (payload_offset, payload_length).
func bzImagePayload(bz []byte) ([]byte, error) {
	if len(bz) < 0x250 || string(bz[0x202:0x206]) != "HdrS" {
		return nil, errors.New("not a bzImage")
	}
	setupSects := int(bz[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	pm := (setupSects + 1) * 512
	off := pm + int(binary.LittleEndian.Uint32(bz[0x248:]))
	n := int(binary.LittleEndian.Uint32(bz[0x24c:]))
	if off <= 0 || n <= 0 || off+n > len(bz) {
		return nil, errors.New("bzImage payload out of range")
	}
	return bz[off : off+n], nil
}

func decompressKernel(payload []byte, out io.Writer) error {
	switch {
	case bytes.HasPrefix(payload, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		xz, err := exec.LookPath("xz")
		if err != nil {
			return err
		}
		// The kernel appends its uncompressed size after the stream,
		// which --single-stream ignores.
		cmd := exec.Command(xz, "-dc", "--single-stream")
		cmd.Stdin = bytes.NewReader(payload)
		cmd.Stdout = out
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("xz: %w: %s", err, stderr.String())
		}
		return nil
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		z, err := gzip.NewReader(bytes.NewReader(payload))
		if err != nil {
			return err
		}
		z.Multistream(false)
		_, err = io.Copy(out, z)
		return err
	}
	return errors.New("kernel compression not handled (only xz and gzip)")
}

// checkPVH looks for the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18), which
// QEMU needs to boot a vmlinux directly.
func checkPVH(f *os.File) error {
	e, err := elf.NewFile(f)
	if err != nil {
		return fmt.Errorf("unpacked kernel: %w", err)
	}
	for _, p := range e.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			return err
		}
		for len(notes) >= 12 {
			namesz := int(binary.LittleEndian.Uint32(notes[0:]))
			descsz := int(binary.LittleEndian.Uint32(notes[4:]))
			typ := binary.LittleEndian.Uint32(notes[8:])
			name := notes[12:min(len(notes), 12+namesz)]
			if string(bytes.TrimRight(name, "\x00")) == "Xen" && typ == 18 {
				return nil
			}
			next := 12 + align4(namesz) + align4(descsz)
			if next > len(notes) {
				break
			}
			notes = notes[next:]
		}
	}
	return errors.New("kernel has no PVH entry point")
}

func align4(n int) int { return (n + 3) &^ 3 }

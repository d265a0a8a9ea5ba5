// Package image does the image-file work of a file SR in the format each
// volume uses: VHD (native Go, plugins/vhd) up to 2040 GiB, qcow2 (through
// qemu-img, which XCP-ng's blktap package ships) above. It knows nothing of
// volumes or metadata; the volume layer and the GC call it.
package image

import (
	"context"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/vhd"
)

// Size limits: a VHD addresses at most 2040 GiB (blktap vhd-util and
// xcp-ng/sm vhdutil.py MAX_VHD_SIZE); above that XCP-ng uses qcow2.
const (
	// VHDMax is the largest VHD XCP-ng accepts.
	VHDMax = vhd.MaxSize
	// QCOW2Min: requests in (2040 GiB, 2 TiB] are rounded up to 2 TiB so
	// that Xen Orchestra, which picks the export format by size, asks for
	// qcow2 instead of a VHD export xapi would refuse.
	QCOW2Min = 2 << 40
	// QCOW2Max keeps a fully allocated image plus metadata under ext4's
	// 16 TiB file limit (sm patch 0144).
	QCOW2Max = 17589500641280
	// qcow2Cluster is the cluster size we create qcow2 images with.
	qcow2Cluster = 64 << 10
)

// Errors a caller can act on.
var (
	// ErrTooLarge: beyond what the SR's formats can hold.
	ErrTooLarge = errors.New("requested size is larger than the SR supports")
	// ErrShrink: images only grow.
	ErrShrink = errors.New("shrinking a volume is not supported")
	// ErrInvalidSize: zero or negative.
	ErrInvalidSize = errors.New("invalid volume size")
)

// Choose picks the format for a new volume of at least size bytes and the
// size it will really have.
func Choose(size int64) (format string, rounded int64, err error) {
	switch {
	case size <= 0:
		return "", 0, fmt.Errorf("%d bytes: %w", size, ErrInvalidSize)
	case size <= VHDMax:
		return store.FormatVHD, roundUp(size, vhd.BlockSize), nil
	case size <= QCOW2Min:
		return store.FormatQCOW2, QCOW2Min, nil
	case size <= QCOW2Max:
		return store.FormatQCOW2, roundUp(size, qcow2Cluster), nil
	}
	return "", 0, fmt.Errorf("%d bytes (largest is %d): %w", size, int64(QCOW2Max), ErrTooLarge)
}

// RoundResize is the size a resize of a format-volume to size really
// gives: a VHD grows by whole blocks (2 MiB), a qcow2 by 512-byte sectors.
// The volume record stores this, so it never claims less than the image.
func RoundResize(format string, size int64) int64 {
	if format == store.FormatVHD {
		return roundUp(size, vhd.BlockSize)
	}
	return roundUp(size, 512)
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// FormatOf tells the format of an image file from its extension.
func FormatOf(path string) string { return strings.TrimPrefix(filepath.Ext(path), ".") }

// Files does image operations; Runner runs qemu-img for qcow2.
type Files struct {
	Runner run.Runner
}

func (x Files) qemuImg(ctx context.Context, args ...string) (run.Result, error) {
	if x.Runner == nil {
		return run.Result{}, fmt.Errorf("qcow2 needs qemu-img: %w", run.ErrToolMissing)
	}
	return x.Runner.Run(ctx, run.Cmd{Tool: "qemu-img", Args: args})
}

var qcow2Opts = "compat=1.1,cluster_size=" + strconv.Itoa(qcow2Cluster)

// Create makes a new empty image of size bytes. VHDs get a BAT sized for
// 2040 GiB, like XCP-ng's vhd-util create -S, so that resizes never move
// data.
func (x Files) Create(ctx context.Context, path string, size int64) error {
	switch FormatOf(path) {
	case store.FormatVHD:
		return vhd.Create(path, size, vhd.CreateOptions{MaxSize: VHDMax})
	case store.FormatQCOW2:
		tmp := tmpName(path)
		defer os.Remove(tmp)
		if _, err := x.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-o", qcow2Opts, tmp, strconv.FormatInt(size, 10)); err != nil {
			return fmt.Errorf("creating %s: %w", path, err)
		}
		return publish(tmp, path)
	}
	return fmt.Errorf("BUG: unknown image format of %s", path)
}

// Snapshot makes child a new empty image on top of parent (same format,
// same directory). The child names its parent relative to itself.
func (x Files) Snapshot(ctx context.Context, child, parent string) error {
	switch FormatOf(parent) {
	case store.FormatVHD:
		return vhd.Snapshot(child, parent, vhd.CreateOptions{MaxSize: VHDMax})
	case store.FormatQCOW2:
		tmp := tmpName(child)
		defer os.Remove(tmp)
		if _, err := x.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-o", qcow2Opts, "-b", filepath.Base(parent), "-F", "qcow2", tmp); err != nil {
			return fmt.Errorf("creating %s on top of %s: %w", child, parent, err)
		}
		return publish(tmp, child)
	}
	return fmt.Errorf("BUG: unknown image format of %s", parent)
}

// Resize grows an image (offline).
func (x Files) Resize(ctx context.Context, path string, size int64) error {
	switch FormatOf(path) {
	case store.FormatVHD:
		img, err := vhd.Open(path, true)
		if err != nil {
			return err
		}
		defer img.Close()
		err = img.Resize(size)
		switch {
		case errors.Is(err, vhd.ErrShrink):
			return fmt.Errorf("%w: %v", ErrShrink, err)
		case errors.Is(err, vhd.ErrTooLarge):
			return fmt.Errorf("%w: a VHD volume cannot grow past 2040 GiB; copy it to a new volume instead (%v)", ErrTooLarge, err)
		}
		return err
	case store.FormatQCOW2:
		// qemu-img refuses a size that is not a multiple of 512 ("The new
		// size must be a multiple of 512", qemu block/qcow2.c); the VHD
		// path rounds up to its block size, so this one rounds up too.
		size = RoundResize(store.FormatQCOW2, size)
		if size > QCOW2Max {
			return fmt.Errorf("%d bytes: %w", size, ErrTooLarge)
		}
		_, err := x.qemuImg(ctx, "resize", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
		return err
	}
	return fmt.Errorf("BUG: unknown image format of %s", path)
}

// Coalesce copies every block child holds into parent, its parent image.
// Readers of chains through child see no change (child still shadows the
// same blocks with the same data), so it is safe while leaves below child
// are in use, and safe to repeat after a crash.
func (x Files) Coalesce(ctx context.Context, child, parent string) error {
	switch FormatOf(child) {
	case store.FormatVHD:
		return coalesceVHD(ctx, child, parent)
	case store.FormatQCOW2:
		_, err := x.qemuImg(ctx, "commit", "-q", "-f", "qcow2", "-d", child)
		return err
	}
	return fmt.Errorf("BUG: unknown image format of %s", child)
}

func coalesceVHD(ctx context.Context, child, parent string) error {
	c, err := vhd.Open(child, false)
	if err != nil {
		return err
	}
	defer c.Close()
	p, err := vhd.Open(parent, true)
	if err != nil {
		return err
	}
	defer p.Close()
	if c.VirtualSize() > p.VirtualSize() {
		if err := p.Resize(c.VirtualSize()); err != nil {
			return err
		}
	}
	for b := uint32(0); b < c.Blocks(); b++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		bm, data, ok, err := c.ReadBlock(b)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if err := p.MergeBlock(b, bm, data); err != nil {
			return fmt.Errorf("coalescing block %d of %s into %s: %w", b, child, parent, err)
		}
	}
	return p.Sync()
}

// Reparent points child at a new parent image (vhd-util modify -p,
// qemu-img rebase -u).
func (x Files) Reparent(ctx context.Context, child, parent string) error {
	switch FormatOf(child) {
	case store.FormatVHD:
		img, err := vhd.Open(child, true)
		if err != nil {
			return err
		}
		defer img.Close()
		return img.SetParent(parent)
	case store.FormatQCOW2:
		_, err := x.qemuImg(ctx, "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Base(parent), child)
		return err
	}
	return fmt.Errorf("BUG: unknown image format of %s", child)
}

// SetHidden marks a VHD as a hidden base copy (tapdisk's flag). qcow2 has
// no standard equivalent; the SR metadata is authoritative anyway.
func (x Files) SetHidden(path string) error { return setHidden(path, true) }

// Unhide clears the hidden flag of a VHD (a base copy that becomes a
// VDI's leaf again, by leaf-coalesce).
func (x Files) Unhide(path string) error { return setHidden(path, false) }

func setHidden(path string, hidden bool) error {
	if FormatOf(path) != store.FormatVHD {
		return nil
	}
	img, err := vhd.Open(path, true)
	if err != nil {
		return err
	}
	defer img.Close()
	return img.SetHidden(hidden)
}

func tmpName(path string) string {
	return filepath.Join(filepath.Dir(path), ".tmp-"+store.NewID()+"."+FormatOf(path))
}

// publish renames a finished temporary image into place and makes the
// rename durable.
func publish(tmp, path string) error {
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	f.Close()
	// A volume is a decrypted VM disk: root only (qemu-img creates 0644
	// under the usual umask; tapdisk runs as root).
	if err := os.Chmod(tmp, 0o600); err != nil {
		return err
	}
	return durable.Rename(tmp, path)
}

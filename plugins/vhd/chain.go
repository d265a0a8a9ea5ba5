package vhd

import (
	"fmt"
)

// MaxChainDepth bounds how far Chain follows parents (a loop guard; the
// volume layer refuses to build chains anywhere near this deep).
const MaxChainDepth = 64

// Chain is a leaf and its ancestors, opened read-only, read the way tapdisk
// reads a VHD chain: each sector from the nearest image that holds it.
type Chain struct {
	Images []*Image // leaf first
}

// OpenChain opens path and every parent its locators name.
func OpenChain(path string) (*Chain, error) {
	c := &Chain{}
	for p := path; p != ""; {
		if len(c.Images) >= MaxChainDepth {
			c.Close()
			return nil, fmt.Errorf("%s: chain deeper than %d", path, MaxChainDepth)
		}
		img, err := Open(p, false)
		if err != nil {
			c.Close()
			return nil, err
		}
		if n := len(c.Images); n > 0 && c.Images[n-1].hdr.ParentUUID != img.ftr.UUID {
			img.Close()
			c.Close()
			return nil, fmt.Errorf("%s: parent %s has uuid %x, the child expects %x: %w",
				path, p, img.ftr.UUID, c.Images[n-1].hdr.ParentUUID, ErrNotVHD)
		}
		c.Images = append(c.Images, img)
		if p, err = img.ParentPath(); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// Close closes every image.
func (c *Chain) Close() {
	for _, i := range c.Images {
		i.Close()
	}
}

// VirtualSize is the leaf's size.
func (c *Chain) VirtualSize() int64 { return c.Images[0].VirtualSize() }

// ReadAt reads sector-aligned data through the chain; sectors no image
// holds read as zeros.
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > c.VirtualSize() {
		return 0, ErrOutOfRange
	}
	clear(p)
	need := make([]bool, len(p)/SectorSize)
	for k := range need {
		need[k] = true
	}
	buf := make([]byte, len(p))
	for _, img := range c.Images {
		end := off + int64(len(p))
		if end > img.VirtualSize() {
			end = img.VirtualSize()
		}
		if end <= off {
			continue
		}
		present, err := img.ReadOwnAt(buf[:end-off], off)
		if err != nil {
			return 0, err
		}
		for k, ok := range present {
			if ok && need[k] {
				copy(p[k*SectorSize:(k+1)*SectorSize], buf[k*SectorSize:(k+1)*SectorSize])
				need[k] = false
			}
		}
	}
	return len(p), nil
}

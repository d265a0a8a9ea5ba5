// Package store is the SR-local metadata of a file-based SR: one small JSON
// record per image file under <sr>/.luksext/nodes, each replaced
// atomically. One record per file (rather than one database) keeps
// Volume.stat to a single small read, lets parallel calls update different
// volumes without rewriting a shared file, and survives kill -9 at any
// point: a reader sees the old record or the new one, never a torn one.
package store

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// MetaDir is the store's directory under the SR root. It starts with a
// dot so that it is never mistaken for a volume.
const MetaDir = ".luksext"

// Schema is the version of the records written by this code.
const Schema = 1

// Errors a caller can act on.
var (
	// ErrNotFound: no record with that id.
	ErrNotFound = errors.New("no such volume")
	// ErrCorrupt: a record exists but cannot be read.
	ErrCorrupt = errors.New("SR metadata record is damaged")
	// ErrUnreadable: the SR's metadata directory cannot be read (the SR is
	// not mounted, or the filesystem failed).
	ErrUnreadable = errors.New("SR metadata cannot be read")
)

// Image formats (the file extension).
const (
	FormatVHD   = "vhd"
	FormatQCOW2 = "qcow2"
)

// VDI is what xapi sees of a volume. A node without one is a hidden base
// copy of the snapshot tree.
type VDI struct {
	Name        string            `json:"name"`
	Description string            `json:"description"`
	ReadWrite   bool              `json:"read_write"`
	Sharable    bool              `json:"sharable"`
	Keys        map[string]string `json:"keys"`
}

// Node is one image file of the SR: a VDI's leaf (VDI set; its id is the
// volume key) or a hidden internal node (VDI nil).
type Node struct {
	Schema      int    `json:"schema"`
	ID          string `json:"id"`
	Format      string `json:"format"`
	Parent      string `json:"parent,omitempty"`
	VirtualSize int64  `json:"virtual_size"`
	VDI         *VDI   `json:"vdi,omitempty"`
}

// File is the image file name of the node, relative to the SR root.
func (n Node) File() string { return n.ID + "." + n.Format }

// Store is the metadata of the SR mounted at SR.
type Store struct {
	SR string
}

// New returns the store of the SR at sr.
func New(sr string) Store { return Store{SR: sr} }

// Dir is <sr>/.luksext.
func (s Store) Dir() string { return filepath.Join(s.SR, MetaDir) }

func (s Store) nodesDir() string { return filepath.Join(s.Dir(), "nodes") }

// Path returns a path under the store's directory.
func (s Store) Path(elem ...string) string {
	return filepath.Join(append([]string{s.Dir()}, elem...)...)
}

// ImagePath is the absolute path of the node's image file.
func (s Store) ImagePath(n Node) string { return filepath.Join(s.SR, n.File()) }

func (s Store) recordPath(id string) string { return filepath.Join(s.nodesDir(), id+".json") }

// ValidID accepts only what NewID makes: a lowercase uuid (8-4-4-4-12
// hex). Ids arrive from callers (volume keys) and from files on the SR
// (records, journals); anything else could name a path outside the SR.
func ValidID(id string) bool {
	if len(id) != 36 {
		return false
	}
	for i, c := range id {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// ValidFormat: the image formats a record may name (its file extension).
func ValidFormat(f string) bool { return f == FormatVHD || f == FormatQCOW2 }

// Validate checks a record read from disk before any of it becomes a
// path: a record saying "format":"vhd/../../../tmp/x" must not make
// Volume.destroy delete a file outside the SR.
func (n Node) Validate() error {
	switch {
	case !ValidID(n.ID):
		return fmt.Errorf("id %q is not a uuid", n.ID)
	case !ValidFormat(n.Format):
		return fmt.Errorf("format %q is neither %s nor %s", n.Format, FormatVHD, FormatQCOW2)
	case n.Parent != "" && !ValidID(n.Parent):
		return fmt.Errorf("parent %q is not a uuid", n.Parent)
	case n.Parent == n.ID:
		return fmt.Errorf("is its own parent")
	case n.VirtualSize < 0:
		return fmt.Errorf("virtual size %d is negative", n.VirtualSize)
	}
	return nil
}

// Get reads one record.
func (s Store) Get(id string) (Node, error) {
	var n Node
	if !ValidID(id) {
		return n, fmt.Errorf("%q: %w", id, ErrNotFound)
	}
	b, err := os.ReadFile(s.recordPath(id))
	if errors.Is(err, os.ErrNotExist) {
		return n, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	if err != nil {
		return n, fmt.Errorf("reading record of %s: %w: %v", id, ErrUnreadable, err)
	}
	if err := json.Unmarshal(b, &n); err != nil || n.ID != id {
		return n, fmt.Errorf("record %s: %w", s.recordPath(id), ErrCorrupt)
	}
	if err := n.Validate(); err != nil {
		return Node{}, fmt.Errorf("record %s: %w: %v", s.recordPath(id), ErrCorrupt, err)
	}
	return n, nil
}

// Put writes (creates or replaces) a record atomically.
func (s Store) Put(n Node) error {
	if err := n.Validate(); err != nil {
		return fmt.Errorf("BUG: invalid node: %v", err)
	}
	n.Schema = Schema
	b, err := json.Marshal(n)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(s.nodesDir(), 0o700); err != nil {
		return err
	}
	done, err := s.beginChange()
	if err != nil {
		return err
	}
	defer done()
	return durable.WriteFile(s.recordPath(n.ID), b, 0o600)
}

// Delete removes a record; deleting an absent record is not an error.
func (s Store) Delete(id string) error {
	done, err := s.beginChange()
	if err != nil {
		return err
	}
	defer done()
	err = os.Remove(s.recordPath(id))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return durable.SyncDir(s.nodesDir())
}

// List reads every record. It fails (never returns a partial or empty
// list) when the directory or any record cannot be read: SR.ls is
// authoritative, and xapi forgets VDIs missing from it.
func (s Store) List() ([]Node, error) {
	entries, err := os.ReadDir(s.nodesDir())
	if errors.Is(err, os.ErrNotExist) {
		// A fresh SR has no nodes directory yet; but an unmounted SR has no
		// metadata directory at all, which is an error.
		if _, derr := os.Stat(s.Dir()); derr != nil {
			if _, serr := os.Stat(s.SR); serr != nil {
				return nil, fmt.Errorf("%s: %w: %v", s.SR, ErrUnreadable, serr)
			}
		}
		return []Node{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", s.nodesDir(), ErrUnreadable, err)
	}
	var ids []string
	for _, e := range entries {
		name := e.Name()
		if strings.HasSuffix(name, ".json") && !strings.HasPrefix(name, ".") {
			ids = append(ids, strings.TrimSuffix(name, ".json"))
		}
	}
	// Records are independent small files: read them in parallel, which
	// matters at thousands of volumes (SR.ls runs at every SR scan).
	nodes := make([]Node, len(ids))
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	next := make(chan int)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				nodes[i], errs[i] = s.Get(ids[i])
			}
		}()
	}
	for i := range ids {
		next <- i
	}
	close(next)
	wg.Wait()
	out := make([]Node, 0, len(ids))
	for i, err := range errs {
		if errors.Is(err, ErrNotFound) {
			continue // deleted between ReadDir and Get
		}
		if err != nil {
			return nil, err
		}
		out = append(out, nodes[i])
	}
	return out, nil
}

// NewID returns a fresh random (version 4) UUID: volume keys, node ids.
func NewID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// WriteJSON writes v as JSON to path atomically.
func WriteJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return durable.WriteFile(path, append(b, '\n'), 0o600)
}

// ReadJSON reads path into v; os.ErrNotExist passes through.
func ReadJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, ErrCorrupt)
	}
	return nil
}

// JournalDir holds the journals of multi-step volume operations
// (snapshot, clone, resize): one file per operation in progress.
func (s Store) JournalDir() string { return s.Path("journal") }

// JournalPending reports whether a volume operation is unfinished: its
// journal is still there. The GC does nothing while one is, since it would
// see a half-built tree; the next volume call finishes it.
func (s Store) JournalPending() (bool, error) {
	entries, err := os.ReadDir(s.JournalDir())
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".json") && !strings.HasPrefix(e.Name(), ".") {
			return true, nil
		}
	}
	return false, nil
}

// Exists reports whether path exists. A resumed journal step asks it of the
// file a rename made (or was about to make); any other error is returned.
func Exists(path string) (bool, error) {
	_, err := os.Stat(path)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return false, err
}

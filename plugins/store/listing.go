package store

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/lock"
)

// The listing cache makes SR.ls at thousands of volumes cost one file
// read instead of one open+read+JSON decode per record (10 000 records:
// ~230 ms of syscalls alone on a PTI/virtualised host). It is derived data
// and never the source of truth:
//
//   - <sr>/.luksext/nodes.gen holds 16 random bytes, the generation. Every
//     record change (Put, Delete) first takes a shared flock on it, writes a
//     fresh random generation and fdatasyncs it, then changes the record,
//     and drops the lock only after the change is durable. A kill -9 or a
//     power cut anywhere after the new generation leaves a generation no
//     cache was built at; before it, nothing changed.
//   - <sr>/.luksext/listing.cache is every record, tagged with the
//     generation and the nodes directory's inode, mtime and ctime, and
//     protected by a CRC-32C. The builder reads the tag with the flock
//     held exclusively (without waiting: a writer holding it means a
//     change in progress, and then no cache is saved), then the records.
//     A writer that starts after that bumps the generation before it
//     changes anything, so a cache built meanwhile is stale on arrival;
//     the builder reads the tag again after the records only to avoid
//     writing such a cache.
//   - A reader uses the cache only when its tag equals the current
//     generation and directory stat and the checksum holds; otherwise it
//     reads the records (and may rebuild the cache). The directory part of
//     the tag catches record files created, renamed or removed by anything
//     that does not bump the generation (an older luksext, a person), as
//     far as the directory's timestamps can tell (a change within the
//     same clock tick as the cache's build is not seen); a record edited
//     in place by hand is not seen until the next change through the
//     store. The store itself never edits a record in place.
//
// Random generations (rather than a counter) need no read-modify-write
// under concurrent writers and can never come back to an earlier value.
// The cache file itself is written without fsync: after a power cut it is
// the old one (older tag), a torn one (bad checksum) or the new one.
const (
	genFile       = "nodes.gen"
	listingFile   = "listing.cache"
	listingMagic  = "LXLST02\n"
	listingHeader = len(listingMagic) + 16 + 8 + 8 + 8 + 4
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// Derived reports whether path (relative to the SR root) is one of the
// listing cache's files: derived data, not part of the SR's state.
func Derived(rel string) bool {
	switch rel {
	case filepath.Join(MetaDir, genFile), filepath.Join(MetaDir, listingFile),
		filepath.Join(MetaDir, allocFile), filepath.Join(MetaDir, volumesFile):
		return true
	}
	return false
}

// listingTag says which state of the records a listing describes.
type listingTag struct {
	gen          [16]byte
	ino          uint64
	mtime, ctime int64 // ns since the epoch
}

func (s Store) genPath() string     { return filepath.Join(s.Dir(), genFile) }
func (s Store) listingPath() string { return filepath.Join(s.Dir(), listingFile) }

// beginChange announces a record change: it takes the generation file's
// lock shared (writers run in parallel; only a listing build excludes
// them, and only for a few syscalls), makes the new generation durable,
// and returns the function that drops the lock once the change is done.
func (s Store) beginChange() (func(), error) {
	f, err := os.OpenFile(s.genPath(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("SR metadata generation: %w", err)
	}
	fd := int(f.Fd())
	if err := lock.Flock(fd, unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	var g [16]byte
	if _, err := rand.Read(g[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	_, err = f.WriteAt(g[:], 0)
	if err == nil {
		err = unix.Fdatasync(fd)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}

// currentTag reads the generation and the nodes directory's stat. With
// exclusive, it first takes the generation lock without waiting, and
// reports ok=false when a writer holds it (a change is in progress). A
// missing generation file is created (exclusive only) or makes ok false.
func (s Store) currentTag(exclusive bool) (listingTag, bool) {
	var t listingTag
	flags := os.O_RDONLY
	if exclusive {
		flags = os.O_RDWR | os.O_CREATE
	}
	f, err := os.OpenFile(s.genPath(), flags, 0o600)
	if err != nil {
		return t, false
	}
	defer f.Close()
	if exclusive && lock.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return t, false
	}
	n, err := f.ReadAt(t.gen[:], 0)
	if n != len(t.gen) {
		if !exclusive || (err != nil && err != io.EOF) {
			return t, false
		}
		// A new SR, or one last written by a luksext without the cache:
		// start a generation (no writer can be running: we hold the lock).
		if _, err := rand.Read(t.gen[:]); err != nil {
			panic(err)
		}
		if _, err := f.WriteAt(t.gen[:], 0); err != nil || unix.Fdatasync(int(f.Fd())) != nil {
			return t, false
		}
	}
	var st unix.Stat_t
	if unix.Stat(s.nodesDir(), &st) != nil {
		return t, false
	}
	t.ino = st.Ino
	t.mtime = st.Mtim.Nano()
	t.ctime = st.Ctim.Nano()
	return t, true
}

// ListingCurrent reports whether the listing cache is current, i.e.
// whether the next Listing is answered from it (tests, diagnostics).
func (s Store) ListingCurrent() bool {
	t, ok := s.currentTag(false)
	if !ok {
		return false
	}
	_, err := s.readListing(t)
	return err == nil
}

// Listing is the store's records as SR.ls renders them: every node, and
// for each VDI its keys already encoded as a JSON object (encoding/json's
// encoding of Keys, "{}" when there are none). The nodes' VDI.Keys are
// nil: a map per VDI (10 000 of them) costs more than all the rest of a
// cached listing.
type Listing struct {
	Nodes []Node
	keys  []string // of Nodes[i]; nilKeysJSON for no keys object at all
	// Tag names the state of the records the listing is provably of
	// (ListingTag equals it while they are unchanged); "" when it was read
	// while a change was in progress.
	Tag string
}

// KeysJSON is the keys object of Nodes[i], a VDI.
func (l Listing) KeysJSON(i int) string {
	if l.nilKeys(i) {
		return "{}"
	}
	return l.keys[i]
}

// Listing is List served from the listing cache when the cache is
// provably current, else from the records (rebuilding the cache when no
// writer is busy). Same nodes, same errors as List: SR.ls uses it.
func (s Store) Listing() (Listing, error) {
	if t, ok := s.currentTag(false); ok {
		if l, err := s.readListing(t); err == nil {
			l.Tag = t.String()
			return l, nil
		}
	}
	before, ok := s.currentTag(true)
	nodes, err := s.List()
	if err != nil {
		return Listing{}, err
	}
	if duringListingBuild != nil {
		duringListingBuild()
	}
	b, l := encodeListing(before, nodes)
	if !ok {
		return l, nil
	}
	if after, ok := s.currentTag(true); ok && after == before {
		// Best effort: a cache that cannot be written is only slower.
		_ = s.saveListing(b)
		l.Tag = before.String()
	}
	return l, nil
}

// nilKeys: the record had no keys object at all (KeysJSON says "{}").
func (l Listing) nilKeys(i int) bool { return l.keys[i] == nilKeysJSON }

// duringListingBuild, when set (tests), runs between the reading of the
// records and the second tag check of a cache build.
var duringListingBuild func()

// errStale: the cache does not describe the records as they are now.
var errStale = errors.New("listing cache is stale or damaged")

// readListing decodes the cache if it carries tag and is intact.
func (s Store) readListing(t listingTag) (Listing, error) {
	b, err := os.ReadFile(s.listingPath())
	if err != nil {
		return Listing{}, err
	}
	got, err := decodeListingHeader(b)
	if err != nil {
		return Listing{}, err
	}
	if got != t {
		return Listing{}, errStale
	}
	return decodeListing(b)
}

func decodeListingHeader(b []byte) (listingTag, error) {
	var t listingTag
	if len(b) < listingHeader+4 || string(b[:len(listingMagic)]) != listingMagic {
		return t, errStale
	}
	body := b[:len(b)-4]
	if crc32.Checksum(body, crc32c) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return t, errStale
	}
	p := b[len(listingMagic):]
	copy(t.gen[:], p[:16])
	t.ino = binary.LittleEndian.Uint64(p[16:])
	t.mtime = int64(binary.LittleEndian.Uint64(p[24:]))
	t.ctime = int64(binary.LittleEndian.Uint64(p[32:]))
	return t, nil
}

// node flags in the cache
const (
	fQCOW2 = 1 << iota
	fParent
	fVDI
	fReadWrite
	fSharable
)

// encodeListing encodes the cache file of nodes at tag, and returns the
// Listing of the same nodes (which shares their VDI records, keys
// removed).
func encodeListing(t listingTag, nodes []Node) ([]byte, Listing) {
	l := Listing{Nodes: make([]Node, len(nodes)), keys: make([]string, len(nodes))}
	b := make([]byte, 0, listingHeader+len(nodes)*160+4)
	b = append(b, listingMagic...)
	b = append(b, t.gen[:]...)
	b = binary.LittleEndian.AppendUint64(b, t.ino)
	b = binary.LittleEndian.AppendUint64(b, uint64(t.mtime))
	b = binary.LittleEndian.AppendUint64(b, uint64(t.ctime))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(nodes)))
	str := func(s string) {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	for i, n := range nodes {
		var fl byte
		if n.Format == FormatQCOW2 {
			fl |= fQCOW2
		}
		if n.Parent != "" {
			fl |= fParent
		}
		var keys string
		if v := n.VDI; v != nil {
			fl |= fVDI
			if v.ReadWrite {
				fl |= fReadWrite
			}
			if v.Sharable {
				fl |= fSharable
			}
			keys = nilKeysJSON
			if v.Keys != nil {
				k, _ := json.Marshal(v.Keys) // a string map always marshals, keys sorted
				keys = string(k)
			}
			n.VDI = &VDI{Name: v.Name, Description: v.Description, ReadWrite: v.ReadWrite, Sharable: v.Sharable}
		}
		l.Nodes[i], l.keys[i] = n, keys
		b = append(b, n.ID...)
		b = append(b, fl)
		if n.Parent != "" {
			b = append(b, n.Parent...)
		}
		b = binary.AppendUvarint(b, uint64(n.VirtualSize))
		if v := n.VDI; v != nil {
			str(v.Name)
			str(v.Description)
			str(keys)
		}
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, crc32c)), l
}

// nilKeysJSON stands for a record without keys: "{}" is what xapi must
// see (a volume's keys are never null), and one of the two spellings of
// an empty object distinguishes it from an empty map.
const nilKeysJSON = "{ }"

// decodeListing decodes a checked cache. Strings share one copy of the
// file's bytes (no allocation per string); every node is validated as a
// record read from disk is, so a damaged cache can never name a path
// outside the SR.
func decodeListing(b []byte) (Listing, error) {
	if len(b) == listingHeader+4 {
		return Listing{Nodes: []Node{}, keys: []string{}}, nil
	}
	count := binary.LittleEndian.Uint32(b[listingHeader-4:])
	// The strings point into b, which this package allocated (readListing)
	// and never changes nor hands out: no copy of the whole file.
	data := unsafe.String(&b[listingHeader], len(b)-4-listingHeader)
	if uint64(count) > uint64(len(data))/38 {
		return Listing{}, errStale
	}
	l := Listing{Nodes: make([]Node, count), keys: make([]string, count)}
	vdis := make([]VDI, 0, count)
	p := 0
	bad := false
	uvarint := func() uint64 {
		var x uint64
		for shift := 0; shift < 64; shift += 7 {
			if p >= len(data) {
				bad = true
				return 0
			}
			c := data[p]
			p++
			x |= uint64(c&0x7f) << shift
			if c < 0x80 {
				return x
			}
		}
		bad = true
		return 0
	}
	str := func() string {
		n := uvarint()
		if bad || n > uint64(len(data)-p) {
			bad = true
			return ""
		}
		s := data[p : p+int(n)]
		p += int(n)
		return s
	}
	for i := range l.Nodes {
		if len(data)-p < 38 {
			return Listing{}, errStale
		}
		n := &l.Nodes[i]
		n.Schema = Schema
		n.ID = data[p : p+36]
		fl := data[p+36]
		p += 37
		n.Format = FormatVHD
		if fl&fQCOW2 != 0 {
			n.Format = FormatQCOW2
		}
		if fl&fParent != 0 {
			if len(data)-p < 36 {
				return Listing{}, errStale
			}
			n.Parent = data[p : p+36]
			p += 36
		}
		vs := uvarint()
		if vs > 1<<62 {
			bad = true
		}
		n.VirtualSize = int64(vs)
		if fl&fVDI != 0 {
			vdis = append(vdis, VDI{ReadWrite: fl&fReadWrite != 0, Sharable: fl&fSharable != 0})
			v := &vdis[len(vdis)-1]
			v.Name = str()
			v.Description = str()
			keys := str()
			// the keys object is copied into replies as it is: it must be
			// one (written by encoding/json; the checksum held)
			if len(keys) < 2 || keys[0] != '{' || !json.Valid(unsafe.Slice(unsafe.StringData(keys), len(keys))) {
				bad = true
			}
			l.keys[i] = keys
			n.VDI = v
		}
		if bad || n.Validate() != nil {
			return Listing{}, errStale
		}
	}
	if p != len(data) {
		return Listing{}, errStale
	}
	return l, nil
}

// saveListing writes the cache through a temporary file and a rename, so
// a reader sees the old cache or the new one. No fsync: see above.
func (s Store) saveListing(b []byte) error { return s.saveDerived(listingFile, b) }

// saveDerived writes a derived file (the listing or volumes cache) of
// the store's directory through a temporary file and a rename.
func (s Store) saveDerived(name string, b []byte) error {
	tmp := filepath.Join(s.Dir(), "."+name+".tmp"+strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, filepath.Join(s.Dir(), name)); err != nil {
		os.Remove(tmp)
		return err
	}
	s.removeStaleListingTemps(name)
	return nil
}

// removeStaleListingTemps removes the temporary files of builders killed
// before their rename (older than a minute: a live builder renames its
// own within milliseconds).
func (s Store) removeStaleListingTemps(name string) {
	entries, err := os.ReadDir(s.Dir())
	if err != nil {
		return
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "."+name+".tmp") {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > time.Minute {
			os.Remove(filepath.Join(s.Dir(), e.Name()))
		}
	}
}

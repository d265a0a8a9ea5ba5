package luksext

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk"
)

// SR.ls at 10 000 volumes. Its reply is ~3.5 MB of JSON whose only
// part that changes without a record changing is physical_utilisation,
// the leaf's allocated bytes; one stat per leaf was most of the call.
// So SR.ls keeps its whole last reply in <sr>/.luksext/volumes.cache,
// with where each VDI's physical_utilisation digits sit, tagged by
//
//   - the records' tag (store.ListingTag: generation and nodes directory,
//     bumped before every record change),
//   - the allocation tag (store.AllocTag: the allocation epoch, the boot
//     id and the SR root directory's stat),
//   - the SR path the URIs were rendered with,
//
// and protected by a CRC-32C. A call whose tags all match copies the
// reply and stats only the leaves that have a datapath record (a tapdisk
// may be writing them: they are always stat'ed now). With only the
// allocation tag changed, it stats every leaf and rewrites the numbers;
// otherwise it renders the records anew (store.Listing) with a stat of
// every leaf. The cache is derived data, never the source of truth: a
// missing, damaged or odd one is rebuilt from the records and stats.
//
// Why a cached allocation is exact. A cache's numbers are stats made
// after its allocation tag and the datapath records were read. Every
// writer of a leaf image is either
//
//   - a tapdisk (a VM, or dom0's u0_ attaches for import/export): the
//     datapath writes its record before tapdisk opens the image, keeps it
//     while the image is open, paused or half torn down, and removes it
//     only after the image was closed for good and the allocation epoch
//     bumped (attachment.Manager.Closed, ImageClosed). SR.ls reads the
//     records before the tags: no record seen means the epoch bump that
//     followed the last close is seen too. A host crash loses the
//     records, the tapdisks and any epoch write not yet on disk, and
//     changes the boot id;
//   - a volume call or a GC step, under the exclusive SR lock (SR.ls
//     holds it shared, so none runs during SR.ls): the ones that change
//     a VDI's leaf bump the epoch before they touch it (resize
//     finishResize, snapshot/clone finishSnapshot, GC leaf-coalesce and
//     re-parent in plugins/gc), so a crash half way leaves a stale epoch;
//     create and destroy change the records (bumped first) and the SR
//     root directory. The calls under the shared lock (Volume.set and
//     the like) change records only; the GC's one step without the lock
//     (copying a hidden node into its parent) writes hidden bases only,
//     which SR.ls does not list; luksext adopt writes records only.
//     Reset-on-boot is xapi-storage-script's Volume.clone +
//     Volume.destroy; image data copies (DATA.copy, exports, imports) go
//     through a tapdisk;
//   - anything while the SR was not mounted here: SR.attach bumps the
//     epoch after the mount (mountedStoreDirs);
//   - a person renaming or replacing image files: the root directory's
//     stat, as far as its timestamps can tell (a change within the clock
//     tick of the cache's stats is not seen). An image edited in place by
//     hand is not seen until the next change; Volume.stat always stats.
//
// A stat must also be final when it is made: ext4 allocates delayed
// writes (and the extent blocks they need) at writeback. Our own writes
// that allocate are fsynced before the call returns (plugins/vhd syncs
// every block allocation and new image; qemu-img flushes on close), and
// tapdisk writes with O_DIRECT, allocated at completion. A read-only SR
// (remounted after an error) takes no epoch bump: store.AllocTag
// refuses every cache there.
const (
	volsMagic = "LXVOLS1\n"
	volsName  = 42 // "<uuid>.qcow2", the longest leaf name; NUL padded
	volsEntry = volsName + 4 + 1 + 1
	volsFixed = len(volsMagic) + 4 + 4 + 4 + 4 // magic, tag len, count, reply len, CRC
)

// lsEntry is one VDI of a cached reply: its leaf's name and the place of
// its physical_utilisation digits in the reply.
type lsEntry struct {
	name [volsName]byte
	off  uint32
	n    uint8
}

func (e *lsEntry) file() []byte {
	if i := bytes.IndexByte(e.name[:], 0); i >= 0 {
		return e.name[:i]
	}
	return e.name[:]
}

// lsCache is a volumes.cache read (or one just built): its entries stay
// in the file's encoding, sorted by name, and are decoded one at a time
// (a call with nothing attached decodes none of them).
type lsCache struct {
	tag   string
	reply []byte
	table []byte // n entries of volsEntry bytes
	n     int
	file  []byte // the whole file (reply and table point into it)
	unmap func()
}

// entry decodes entry i; ok=false when it is odd (then the whole cache
// is not used).
func (c *lsCache) entry(i int) (e lsEntry, ok bool) {
	q := c.table[i*volsEntry : (i+1)*volsEntry]
	copy(e.name[:], q[:volsName])
	e.off = binary.LittleEndian.Uint32(q[volsName:])
	e.n = q[volsName+4]
	return e, e.n != 0 && e.n <= 20 && uint64(e.off)+uint64(e.n) <= uint64(len(c.reply)) && leafName(e.file())
}

// find returns the index of the entry of leaf file f, or -1.
func (c *lsCache) find(f string) int {
	if len(f) > volsName {
		return -1
	}
	var key [volsName]byte
	copy(key[:], f)
	i := sort.Search(c.n, func(i int) bool { return bytes.Compare(c.table[i*volsEntry:i*volsEntry+volsName], key[:]) >= 0 })
	if i == c.n || !bytes.Equal(c.table[i*volsEntry:i*volsEntry+volsName], key[:]) {
		return -1
	}
	return i
}

func (c *lsCache) close() {
	if c != nil && c.unmap != nil {
		c.unmap()
	}
}

// ImageClosed is the datapath's attachment.Manager.Closed: tapdisk may
// have grown the image it served, so its SR's cached allocations are
// invalidated before the record that made SR.ls stat it goes.
//
// An SR whose file system went read-only (ext4 errors=remount-ro) takes
// no bump, and its VMs must still shut down: the detach goes on, since
// store.AllocTag serves nothing from a cache on a read-only SR.
func ImageClosed(ctx context.Context, img tapdisk.Image) error {
	err := store.New(filepath.Dir(img.Path)).InvalidateAllocation()
	if errors.Is(err, syscall.EROFS) {
		smapi.Logger(ctx).WithError(err).Warn("the SR is read-only; its cached allocations are not used while it is")
		return nil
	}
	return err
}

func srLs(ctx context.Context, d VolumeDeps, p smapi.SRParams) (smapi.StreamResult, error) {
	v, err := openVolumes(ctx, d, p.SR)
	if err != nil {
		return nil, err
	}
	l, err := v.shared(ctx)
	if err != nil {
		return nil, err
	}
	// Order matters (see above): datapath records, then the tags.
	live, allLive := v.liveImages()
	alloc, allocOK := v.st.AllocTag()
	recs, recsOK := v.st.ListingTag()
	dir, err := os.Open(v.st.SR)
	if err != nil {
		l.Release()
		return nil, err
	}
	dirfd := int(dir.Fd())
	done := func() { dir.Close(); l.Release() }
	want := lsTag(recs, v.st.SR)
	c := readLsCache(v.st.VolumesCachePath())
	if c != nil && recsOK && allocOK && !allLive && c.tag == want+alloc {
		if hits, ok := c.statLive(dirfd, live); ok {
			return func(w io.Writer) error {
				defer done()
				defer c.close()
				return c.writeLive(w, hits)
			}, nil
		}
	}
	restoreGC := func() {}
	var fresh *lsCache
	if c != nil && recsOK && len(c.tag) >= len(want) && c.tag[:len(want)] == want {
		// records unchanged, allocations not provably so: stat them all
		restoreGC = noGC()
		fresh = c.restat(dirfd, want+alloc)
		if allLive {
			allocOK = false // the next call stats them all anyway: no 4 MB write per call
		}
	}
	c.close()
	if fresh == nil {
		listing, err := v.st.Listing()
		if err != nil {
			restoreGC()
			done()
			return nil, err
		}
		// (after the listing: rebuilding it from the records makes
		// garbage that is worth collecting)
		restoreGC()
		restoreGC = noGC()
		fresh = v.render(dirfd, listing, lsTag(listing.Tag, v.st.SR)+alloc)
		if listing.Tag == "" {
			allocOK = false // read while a record changed: not worth keeping
		}
	}
	if allocOK {
		// Best effort: a cache that cannot be written is only slower.
		_ = v.st.SaveVolumesCache(fresh.encode())
	}
	return func(w io.Writer) error {
		defer restoreGC()
		defer done()
		_, err := w.Write(fresh.reply)
		return err
	}, nil
}

// lsTag is the part of a cache's tag that says which records, rendered
// for which SR path, it holds.
func lsTag(records, sr string) string {
	return strconv.Itoa(len(records)) + ":" + records + strconv.Itoa(len(sr)) + ":" + sr
}

// liveImages lists the images a tapdisk may have open (they have a
// datapath record); all: the records could not be listed, so any may.
func (v *volumes) liveImages() (names []string, all bool) {
	if v.d.Datapath == nil {
		return nil, false
	}
	names, err := v.d.Datapath.RecordedImages()
	if err != nil {
		v.log.WithError(err).Warn("cannot list the datapath's records; SR.ls stats every volume")
		return nil, true
	}
	return names, false
}

// noGC turns the garbage collector off until the returned function is
// called. SR.ls runs in a process of its own that exits right after the
// reply: collecting the O(volumes) short-lived garbage of a rebuild
// (three cycles, ~40 ms of CPU at 10 000 volumes) buys nothing. The
// memory limit still bounds the heap; the settings are restored
// afterwards (tests run many calls in one process).
func noGC() func() {
	limit := debug.SetMemoryLimit(512 << 20)
	percent := debug.SetGCPercent(-1)
	return func() {
		debug.SetGCPercent(percent)
		debug.SetMemoryLimit(limit)
	}
}

// lsHit is a VDI whose allocation SR.ls stat'ed now.
type lsHit struct {
	e    lsEntry
	phys int64
}

// statLive stats the leaves in live that c lists (the others are exact:
// see above); ok=false when c is odd.
func (c *lsCache) statLive(dirfd int, live []string) (hits []lsHit, ok bool) {
	var st unix.Stat_t
	name := make([]byte, 0, volsName+1)
	for _, f := range live {
		i := c.find(f)
		if i < 0 {
			continue // another SR's image, or not a VDI's leaf
		}
		e, ok := c.entry(i)
		if !ok {
			return nil, false
		}
		name = append(append(name[:0], f...), 0)
		hits = append(hits, lsHit{e, allocatedAt(dirfd, name, &st)})
	}
	return hits, true
}

// writeLive writes the cached reply with the allocations of hits.
func (c *lsCache) writeLive(w io.Writer, hits []lsHit) error {
	if len(hits) == 0 {
		_, err := w.Write(c.reply)
		return err
	}
	sort.Slice(hits, func(i, j int) bool { return hits[i].e.off < hits[j].e.off })
	bw := bufio.NewWriterSize(w, 64<<10)
	pos := 0
	var num []byte
	for _, h := range hits {
		bw.Write(c.reply[pos:h.e.off])
		num = strconv.AppendInt(num[:0], h.phys, 10)
		bw.Write(num)
		pos = int(h.e.off) + int(h.e.n)
	}
	bw.Write(c.reply[pos:])
	return bw.Flush()
}

// statAll returns the allocated bytes of each named file in dirfd (0 when
// it cannot be stat'ed, as Volume.stat says).
func statAll(dirfd int, n int, name func(i int) []byte) []int64 {
	phys := make([]int64, n)
	inChunks(n, func() func(c, lo, hi int) {
		var st unix.Stat_t
		buf := make([]byte, 0, 64)
		return func(_, lo, hi int) {
			for i := lo; i < hi; i++ {
				phys[i] = allocatedAt(dirfd, append(append(buf[:0], name(i)...), 0), &st)
			}
		}
	})
	return phys
}

// lsChunk is how many leaves one worker of inChunks takes at a time.
const lsChunk = 256

// inChunks calls the chunk functions of its workers for [0, n) by chunks
// of lsChunk (c is the chunk's index, [lo, hi) its range), on more
// workers than CPUs so that a stat waiting for an inode block to be read
// (cold cache after an attach) does not idle a CPU; it returns when all
// chunks are done. newWorker is called once per worker (its scratch).
func inChunks(n int, newWorker func() func(c, lo, hi int)) {
	nchunks := (n + lsChunk - 1) / lsChunk
	workers := min(max(runtime.GOMAXPROCS(0), 4), nchunks)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			do := newWorker()
			for {
				c := int(next.Add(1) - 1)
				if c >= nchunks {
					return
				}
				do(c, c*lsChunk, min((c+1)*lsChunk, n))
			}
		}()
	}
	wg.Wait()
}

// allocatedAt is the allocated bytes of the file named by the
// NUL-terminated name in dirfd, 0 when it cannot be stat'ed (fstatat
// without a C-string copy).
func allocatedAt(dirfd int, name []byte, st *unix.Stat_t) int64 {
	_, _, e := unix.Syscall6(unix.SYS_NEWFSTATAT, uintptr(dirfd), uintptr(unsafe.Pointer(&name[0])), uintptr(unsafe.Pointer(st)), 0, 0, 0)
	if e != 0 {
		return 0
	}
	return st.Blocks * 512
}

// restat is c with every allocation stat'ed now, tagged tag; nil when
// c is odd.
func (c *lsCache) restat(dirfd int, tag string) *lsCache {
	ents := make([]lsEntry, c.n)
	for i := range ents {
		var ok bool
		if ents[i], ok = c.entry(i); !ok || (i > 0 && bytes.Compare(ents[i-1].name[:], ents[i].name[:]) >= 0) {
			return nil
		}
	}
	order := make([]int, len(ents))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return int(ents[a].off) - int(ents[b].off) })
	for k := 1; k < len(order); k++ {
		if ents[order[k]].off < ents[order[k-1]].off+uint32(ents[order[k-1]].n) {
			return nil // overlapping digits
		}
	}
	phys := statAll(dirfd, len(ents), func(i int) []byte { return ents[i].file() })
	b, start := lsFileStart(tag, len(ents), len(c.reply)+len(ents)*4)
	pos := 0
	for _, i := range order {
		e := &ents[i]
		b = append(b, c.reply[pos:e.off]...)
		pos = int(e.off) + int(e.n)
		e.off = uint32(len(b) - start)
		b = strconv.AppendInt(b, phys[i], 10)
		e.n = uint8(len(b) - start - int(e.off))
	}
	b = append(b, c.reply[pos:]...)
	return lsFileFinish(tag, b, start, ents)
}

// lsFileStart begins the volumes.cache file of a reply (see encode) with
// room for it: the reply is appended at start, then lsFileFinish ends
// the file. The reply is built in the file's buffer: no copy of 3.5 MB.
func lsFileStart(tag string, n, replyCap int) (b []byte, start int) {
	b = make([]byte, 0, volsFixed+len(tag)+replyCap+n*volsEntry)
	b = append(b, volsMagic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(tag)))
	b = append(b, tag...)
	b = binary.LittleEndian.AppendUint32(b, uint32(n))
	b = binary.LittleEndian.AppendUint32(b, 0) // the reply's length, set by lsFileFinish
	return b, len(b)
}

// lsFileFinish ends the file b whose reply starts at start, with the
// entries ents (sorted by name) and the checksum.
func lsFileFinish(tag string, b []byte, start int, ents []lsEntry) *lsCache {
	binary.LittleEndian.PutUint32(b[start-4:], uint32(len(b)-start))
	table := len(b)
	for i := range ents {
		e := &ents[i]
		b = append(b, e.name[:]...)
		b = binary.LittleEndian.AppendUint32(b, e.off)
		b = append(b, e.n, 0)
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, crc32c))
	return &lsCache{tag: tag, reply: b[start:table:table], table: b[table : len(b)-4], n: len(ents), file: b}
}

// render builds the reply of listing's VDIs with a stat of every leaf:
// by chunks, each stat'ed and rendered by a worker (inChunks), then put
// together in order.
func (v *volumes) render(dirfd int, listing store.Listing, tag string) *lsCache {
	var vdis []int
	for i := range listing.Nodes {
		if listing.Nodes[i].VDI != nil {
			vdis = append(vdis, i)
		}
	}
	parts := make([][]byte, (len(vdis)+lsChunk-1)/lsChunk)
	ents := make([]lsEntry, len(vdis)) // offsets within their part, at first
	inChunks(len(vdis), func() func(c, lo, hi int) {
		var st unix.Stat_t
		name := make([]byte, 0, volsName+1)
		uri := make([]byte, 0, 256)
		var num []byte
		return func(c, lo, hi int) {
			b := make([]byte, 0, lsChunk*400)
			for k := lo; k < hi; k++ {
				n := &listing.Nodes[vdis[k]]
				name = append(append(append(name[:0], n.ID...), '.'), n.Format...)
				phys := allocatedAt(dirfd, append(name, 0), &st)
				if k > 0 {
					b = append(b, ',')
				}
				// URIs are copied by the encoder, not kept
				uri = append(append(append(append(uri[:0], URIScheme+"://"...), v.st.SR...), '/'), name...)
				id := n.ID
				vol := smapi.Volume{
					Key: n.ID, UUID: &id, Name: n.VDI.Name, Description: n.VDI.Description,
					ReadWrite: n.VDI.ReadWrite, Sharable: n.VDI.Sharable, VirtualSize: n.VirtualSize,
					PhysicalUtilisation: phys, URI: []string{unsafe.String(&uri[0], len(uri))},
				}
				var off int
				b, off = smapi.AppendVolumeKeysJSONAt(b, &vol, listing.KeysJSON(vdis[k]))
				e := &ents[k]
				copy(e.name[:], name)
				e.off = uint32(off)
				num = strconv.AppendInt(num[:0], phys, 10)
				e.n = uint8(len(num))
			}
			parts[c] = b
		}
	})
	size := 2
	for _, p := range parts {
		size += len(p)
	}
	b, start := lsFileStart(tag, len(vdis), size)
	b = append(b, '[')
	for c, p := range parts {
		base := uint32(len(b) - start)
		for k := c * lsChunk; k < min((c+1)*lsChunk, len(vdis)); k++ {
			ents[k].off += base
		}
		b = append(b, p...)
	}
	b = append(b, ']')
	slices.SortFunc(ents, func(a, b lsEntry) int { return bytes.Compare(a.name[:], b.name[:]) })
	return lsFileFinish(tag, b, start, ents)
}

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// encode is the volumes.cache file of c: magic, tag, VDI count, reply
// length, reply, the entries (leaf name, offset and length of the
// digits in the reply), CRC-32C of all before.
func (c *lsCache) encode() []byte { return c.file }

// readLsCache maps and checks the cache file; nil when it is missing or
// damaged (the caller then rebuilds it). The checksum covers the whole
// file (a torn write after a power cut, a damaged block); each entry is
// checked besides when it is used (lsCache.entry), so that none can point
// outside the reply nor name anything but a leaf in the SR directory: an
// odd one makes the call rebuild the cache.
func readLsCache(path string) (c *lsCache) {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) != nil || st.Size < int64(volsFixed) || st.Size > 1<<30 {
		return nil
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(st.Size), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil
	}
	unmap := func() { _ = unix.Munmap(b) }
	// The file is replaced by rename, never changed in place; should a
	// person truncate it under us, the fault is a failed check.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if recover() != nil || c == nil {
			unmap()
			c = nil
		}
	}()
	c = decodeLsCache(b)
	if c != nil {
		c.unmap = unmap
	}
	return c
}

func decodeLsCache(b []byte) *lsCache {
	if len(b) < volsFixed || string(b[:len(volsMagic)]) != volsMagic {
		return nil
	}
	body := b[:len(b)-4]
	if crc32.Checksum(body, crc32c) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil
	}
	p := body[len(volsMagic):]
	tagLen := uint64(binary.LittleEndian.Uint32(p))
	if tagLen > uint64(len(p))-12 {
		return nil
	}
	c := &lsCache{tag: string(p[4 : 4+tagLen])}
	p = p[4+tagLen:]
	n := uint64(binary.LittleEndian.Uint32(p))
	replyLen := uint64(binary.LittleEndian.Uint32(p[4:]))
	p = p[8:]
	if replyLen < 2 || replyLen > uint64(len(p)) || uint64(len(p))-replyLen != n*volsEntry {
		return nil
	}
	c.reply = p[:replyLen:replyLen]
	c.table = p[replyLen:]
	c.n = int(n)
	return c
}

// leafName: "<uuid>.vhd" or "<uuid>.qcow2", nothing else (the entries'
// names are stat'ed relative to the SR directory).
func leafName(f []byte) bool {
	if len(f) < 38 || f[36] != '.' || !store.ValidID(unsafe.String(&f[0], 36)) {
		return false
	}
	return store.ValidFormat(unsafe.String(&f[37], len(f)-37))
}

// Package adopt plans the take-over of an SMAPIv1 `ext` SR's files by a
// luksext SR (`luksext adopt`): which files become which store records,
// with their parents, and what makes an SR not adoptable. It reads files
// and changes nothing; the SR type (sr_adopt.go) carries the plan out.
//
// What an SMAPIv1 EXT SR holds (xcp-ng/sm drivers/FileSR.py, EXTSR.py,
// vhdutil.py, cleanup.py): `<vdi uuid>.vhd` files, dynamic or
// differencing with 2 MiB blocks; a snapshot makes the leaf a hidden base
// (footer byte 85) under a new uuid with two children pointing at it by
// relative parent locators; `<uuid>.raw` VDIs, `<uuid>.cbtlog` CBT logs,
// the GC's journals (relink_*, coalesce_*, leaf_*), `OLD_<uuid>.vhd`
// during a coalesce, IntelliCache `*.vhdcache`. luksext takes over the
// VHDs only; anything else refuses the whole adoption.
package adopt

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/vhd"
)

// Node is one VHD of the SR as it will be recorded.
type Node struct {
	ID          string `json:"key"`
	Parent      string `json:"parent"`
	VirtualSize int64  `json:"virtual_size"`
	// Hidden: a base copy (footer hidden byte set): an internal node of
	// the tree, no VDI.
	Hidden bool `json:"hidden"`
	Names
}

// Plan is the whole adoption, in a stable order (parents first).
type Plan struct {
	Nodes []Node `json:"volumes"`
	// NamesUnused: --names records whose uuid is no VDI of the SR.
	NamesUnused []string `json:"names_unused"`
}

// Record is the store record of n.
func (n Node) Record() store.Node {
	r := store.Node{ID: n.ID, Format: store.FormatVHD, Parent: n.Parent, VirtualSize: n.VirtualSize}
	if !n.Hidden {
		r.VDI = &store.VDI{Name: n.Name, Description: n.Description, ReadWrite: !n.ReadOnly, Sharable: n.Sharable, Keys: map[string]string{}}
	}
	return r
}

// Ours are the names luksext itself writes at the SR root: a rerun of an
// interrupted adoption finds them.
var Ours = []string{store.MetaDir, "luksext-sr.json"}

// Scan plans the adoption of the SR files in dir. names (from --names)
// may be nil. allowOurs accepts luksext's own files (a rerun). Every
// problem found is listed in one Not_adoptable error.
func Scan(dir string, names map[string]Names, allowOurs bool) (Plan, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return Plan{}, fmt.Errorf("reading the SR directory %s: %w", dir, err)
	}
	var problems []string
	type vinfo struct {
		info vhd.Info
		loc  string
	}
	found := map[string]vinfo{}
	for _, e := range entries {
		name := e.Name()
		if name == fileLog && e.Type().IsRegular() {
			if why := unfinishedFileLog(filepath.Join(dir, name)); why != "" {
				problems = append(problems, name+" ("+why+")")
			}
			continue
		}
		if why := unsupported(name, e, allowOurs); why != "" {
			problems = append(problems, name+" ("+why+")")
			continue
		}
		if !strings.HasSuffix(name, ".vhd") {
			continue // lost+found, our own files
		}
		id := strings.TrimSuffix(name, ".vhd")
		p := filepath.Join(dir, name)
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			problems = append(problems, fmt.Sprintf("%s (%v)", name, err))
			continue
		}
		if st.Nlink != 1 {
			// FileSR's snapshot hard-links the leaf to the base's name for
			// a moment: two names for one image is a snapshot cut short.
			problems = append(problems, fmt.Sprintf("%s (has %d hard links: an interrupted SMAPIv1 snapshot; let SMAPIv1 finish or repair it first)", name, st.Nlink))
			continue
		}
		img, err := vhd.Open(p, false)
		if err != nil {
			switch {
			case errors.Is(err, vhd.ErrBlockSize):
				problems = append(problems, name+" (VHD block size is not 2 MiB)")
			default:
				problems = append(problems, fmt.Sprintf("%s (not a dynamic or differencing VHD luksext can read: %v)", name, errors.Unwrap(err)))
			}
			continue
		}
		inf := img.Info()
		img.Close()
		vi := vinfo{info: inf}
		if inf.Type == vhd.TypeDiff {
			vi.loc = inf.ParentLocator
		}
		found[id] = vi
	}

	// Parents: the locator names a file of this directory, whose footer
	// uuid is the one the child's header expects.
	parent := map[string]string{}
	children := map[string][]string{}
	ids := make([]string, 0, len(found))
	for id := range found {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		v := found[id]
		if v.info.Type != vhd.TypeDiff {
			continue
		}
		pname := filepath.Base(v.loc)
		pid := strings.TrimSuffix(pname, ".vhd")
		dirPart := filepath.Dir(filepath.Clean(v.loc))
		pv, ok := found[pid]
		switch {
		case v.loc == "" || (dirPart != "." && filepath.Clean(dirPart) != filepath.Clean(dir)) || !strings.HasSuffix(pname, ".vhd"):
			problems = append(problems, fmt.Sprintf("%s.vhd (its parent locator %q does not name a VHD of this SR)", id, v.loc))
		case !ok:
			problems = append(problems, fmt.Sprintf("%s.vhd (its parent %s is missing or was refused)", id, pname))
		case pv.info.UUID != v.info.ParentUUID:
			problems = append(problems, fmt.Sprintf("%s.vhd (expects a parent with VHD uuid %s, but %s has %s)", id, hexUUID(v.info.ParentUUID), pname, hexUUID(pv.info.UUID)))
		default:
			parent[id] = pid
			children[pid] = append(children[pid], id)
		}
	}
	// Loops, and nodes whose place in the tree luksext does not have.
	for _, id := range ids {
		seen := map[string]bool{id: true}
		for p, depth := parent[id], 0; p != ""; p, depth = parent[p], depth+1 {
			if seen[p] || depth > vhd.MaxChainDepth {
				problems = append(problems, fmt.Sprintf("%s.vhd (its chain loops or is deeper than %d)", id, vhd.MaxChainDepth))
				break
			}
			seen[p] = true
		}
		hidden := found[id].info.Hidden
		switch {
		case hidden && len(children[id]) == 0:
			problems = append(problems, id+".vhd (a hidden base no VHD uses: SMAPIv1's GC has not finished; plug the SR with SMAPIv1 and wait for it, or delete the file)")
		case !hidden && len(children[id]) > 0:
			problems = append(problems, fmt.Sprintf("%s.vhd (a visible VDI that other VHDs (%s) use as parent: an interrupted SMAPIv1 snapshot or coalesce)", id, strings.Join(children[id], ", ")))
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return Plan{}, smapi.Errorf(smapi.KindNotAdoptable, "the SR holds what luksext does not take over, so nothing was changed: %s. See README 'Moving from a hand-made LUKS SR' (disable CBT, let SMAPIv1's GC finish, move or delete .raw VDIs)", strings.Join(problems, "; "))
	}

	// Parents first: records are written in this order.
	var plan Plan
	done := map[string]bool{}
	var add func(id string)
	add = func(id string) {
		if done[id] {
			return
		}
		if p := parent[id]; p != "" {
			add(p)
		}
		done[id] = true
		v := found[id]
		n := Node{ID: id, Parent: parent[id], VirtualSize: v.info.VirtualSize, Hidden: v.info.Hidden}
		if !n.Hidden {
			n.Names = names[id]
		}
		plan.Nodes = append(plan.Nodes, n)
	}
	for _, id := range ids {
		add(id)
	}
	plan.NamesUnused = []string{}
	for id := range names {
		if v, ok := found[id]; !ok || v.info.Hidden {
			plan.NamesUnused = append(plan.NamesUnused, id)
		}
	}
	sort.Strings(plan.NamesUnused)
	return plan, nil
}

// unsupported says why a root entry refuses the adoption ("" when it is
// fine: a VHD to examine, lost+found, or our own files on a rerun).
func unsupported(name string, e os.DirEntry, allowOurs bool) string {
	base, ext, _ := strings.Cut(name, ".")
	switch {
	case name == "lost+found" && e.IsDir():
		return ""
	case allowOurs && name == store.MetaDir && e.IsDir():
		return ""
	case allowOurs && name == "luksext-sr.json" && e.Type().IsRegular():
		return ""
	case name == "sm-hardlink.conf" && e.Type().IsRegular():
		return "" // SharedFileSR's note whether hard links work; no data
	case strings.HasSuffix(name, ".vhd.new"):
		return "the temporary image of an unfinished SMAPIv1 snapshot (FileSR writes <uuid>.vhd.new, then renames it); plug the SR with SMAPIv1 and let it finish or clean up"
	case strings.HasPrefix(name, ".journal-"):
		return "the journal of an unfinished SMAPIv1 resize; plug the SR with SMAPIv1 so that it reverts it"
	case ext == "qcow2":
		return "a QCOW2 VDI; luksext adopt takes over VHDs only (copy it to a VHD VDI first, or move it off the SR)"
	case strings.HasPrefix(name, "relink_") || strings.HasPrefix(name, "coalesce_") || strings.HasPrefix(name, "leaf_"):
		return "an SMAPIv1 garbage-collector journal: its coalesce is unfinished; plug the SR with SMAPIv1 and let the GC finish"
	case strings.HasPrefix(name, "OLD_"):
		return "left by an SMAPIv1 coalesce in progress; let the GC finish"
	case strings.HasSuffix(name, ".vhdcache"):
		return "an IntelliCache file; disable caching (xe vdi-param-set allow-caching=false) and remove it"
	case strings.HasSuffix(name, ".cbtlog"):
		return "a changed-block-tracking log; disable CBT first (xe vdi-disable-cbt)"
	case strings.HasSuffix(name, ".raw"):
		return "a raw VDI; luksext takes over VHDs only (copy it to a VHD VDI first, or move it off the SR)"
	case ext == "vhd" && !store.ValidID(base):
		return "a VHD whose name is not a lowercase VDI uuid"
	case ext == "vhd" && !e.Type().IsRegular():
		return "not a regular file"
	case ext == "vhd":
		return ""
	}
	return "a file luksext does not know"
}

func hexUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// fileLog is FileSR's operation log at the SR root (xcp-ng/sm
// drivers/util.py start_log_entry/end_log_entry): a "log:" line when a
// snapshot or clone starts, an "end:" line (done or error) when it ends.
// A finished log is harmless history and stays; an unfinished entry is
// a snapshot cut short that SMAPIv1 replays at its next attach.
const fileLog = "filelog.txt"

// unfinishedFileLog says which operation of the log never ended ("" when
// all did): every "<date> <time> log: <sr path> <vdi path> ..." needs a
// later "<date> <time> end: <sr path> <vdi path> ..." (FileSR runs them
// one at a time under its SR lock).
func unfinishedFileLog(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	open := map[string]int{}
	var order []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		for i, w := range f {
			if (w != "log:" && w != "end:") || i+2 >= len(f) {
				continue
			}
			key := f[i+2]
			if w == "log:" {
				if open[key] == 0 {
					order = append(order, key)
				}
				open[key]++
			} else if open[key] > 0 {
				open[key]--
			}
			break
		}
	}
	for _, k := range order {
		if open[k] > 0 {
			return "an SMAPIv1 snapshot or clone of " + filepath.Base(k) + " never finished; plug the SR with SMAPIv1 so that it replays it"
		}
	}
	return ""
}

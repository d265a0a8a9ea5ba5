// Package gc is the garbage collector of a file SR's snapshot tree: it
// deletes hidden base copies that nothing uses any more, removes image
// files a crashed call left without a record, and coalesces single-child
// chains (the child's blocks into its parent, then the grandchildren
// re-parented), so that chains stay short after snapshots are deleted.
//
// A VDI's leaf with a hidden parent it alone uses is coalesced into that
// parent too (leaf-coalesce, as SMAPIv1's cleanup.py does): the parent,
// now holding the leaf's data, takes the leaf's file name, so a chain
// ends up one image deep. Steps that change an image a VM's tapdisk has
// open (re-parenting a leaf, leaf-coalesce) run with that tapdisk paused
// (Pause); a chain whose tapdisk cannot be paused is skipped, logged, and
// tried again on the next pass.
//
// Every coalesce is journalled (<sr>/.luksext/gc/journal.json) and each of
// its steps is idempotent, so a GC killed at any point (kill -9, host
// crash) finishes the job on its next run and loses nothing.
package gc

import (
	"context"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/store"
)

// Steps of a coalesce, as recorded in the journal and passed to Fault.
const (
	StepJournalled = "journalled" // journal written, nothing done yet
	StepCopied     = "copied"     // child's blocks are in the parent
	StepReparented = "reparented" // grandchildren point at the parent
	StepDeleted    = "deleted"    // the coalesced node is gone
	// leaf-coalesce (journal kind "leaf")
	StepRenamed  = "renamed"  // the parent's file now has the leaf's name
	StepRecorded = "recorded" // the records say the leaf has the grandparent as parent
)

// DefaultLiveLeafMax: a leaf a VM has open is coalesced only when it holds
// at most this much data, because the VM is paused meanwhile (SMAPIv1's
// LIVE_LEAF_COALESCE_MAX_SIZE is 20 MiB). Larger ones wait until the VM
// stops; the chain is then 2 images deep.
const DefaultLiveLeafMax = 20 << 20

// PauseFunc pauses the tapdisks serving any of the images at paths (a
// no-op for images nothing has open) and returns the function that
// unpauses them, and how many were paused.
type PauseFunc func(ctx context.Context, paths ...string) (resume func(context.Context) error, paused int, err error)

// Collector collects one SR.
type Collector struct {
	Store  store.Store
	Images image.Files
	Log    logrus.FieldLogger
	// SRLock is the lock file every tree change of the volume layer takes.
	SRLock string
	// Fault, when set (tests), is called after each journalled step; a
	// test kills the process there to prove recovery.
	Fault func(step string)
	// OrphanAge: image files without a record are deleted only when older
	// than this (default 10 minutes), as a second guard next to the lock.
	OrphanAge time.Duration
	// Pause brackets changes to images a VM's tapdisk has open; nil means
	// none can have any open.
	Pause PauseFunc
	// RecoverVolumes finishes volume operations a crashed call left
	// journalled (they may hold a VM paused); it takes the SR lock itself.
	RecoverVolumes func(ctx context.Context) error
	// LiveLeafMax overrides DefaultLiveLeafMax.
	LiveLeafMax int64

	// skipped: leaves whose tapdisk could not be paused in this round.
	skipped map[string]bool
}

// Journal kinds.
const kindLeaf = "leaf"

type journal struct {
	Kind   string `json:"kind,omitempty"` // "" coalesce of a hidden node, "leaf"
	Node   string `json:"node"`
	Parent string `json:"parent"`
	Grand  string `json:"grand,omitempty"` // leaf: the parent's parent
	Step   string `json:"step"`
}

func (c *Collector) pause(ctx context.Context, paths ...string) (func(context.Context) error, int, error) {
	if c.Pause == nil {
		return func(context.Context) error { return nil }, 0, nil
	}
	return c.Pause(ctx, paths...)
}

func (c *Collector) journalPath() string { return c.Store.Path("gc", "journal.json") }

func (c *Collector) fault(step string) {
	if c.Fault != nil {
		c.Fault(step)
	}
}

func (c *Collector) lockSR(ctx context.Context) (*lock.Lock, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	return lock.Acquire(ctx, c.SRLock, lock.Exclusive, c.Log)
}

// Pass does one round of work and reports whether it changed anything
// (callers loop until it does not).
func (c *Collector) Pass(ctx context.Context) (bool, error) {
	var j journal
	err := store.ReadJSON(c.journalPath(), &j)
	switch {
	case err == nil:
		c.Log.WithFields(logrus.Fields{"node": j.Node, "parent": j.Parent, "step": j.Step, "kind": j.Kind}).Warn("resuming an interrupted coalesce")
		if j.Kind == kindLeaf {
			l, err := c.lockSR(ctx)
			if err != nil {
				return false, err
			}
			defer l.Release()
			return true, c.FinishLeafCoalesce(ctx)
		}
		return true, c.runCoalesce(ctx, j)
	case !errors.Is(err, os.ErrNotExist):
		return false, err
	}

	if c.RecoverVolumes != nil {
		if pending, err := c.Store.JournalPending(); err != nil {
			return false, err
		} else if pending {
			// a crashed volume call may hold a VM paused: finish it now
			// rather than wait for the next call on that volume
			if err := c.RecoverVolumes(ctx); err != nil {
				return false, fmt.Errorf("finishing interrupted volume operations: %w", err)
			}
		}
	}
	l, err := c.lockSR(ctx)
	if err != nil {
		return false, err
	}
	pending, err := c.Store.JournalPending()
	if err != nil || pending {
		l.Release()
		return false, err // the next volume call finishes it first
	}
	nodes, err := c.Store.List()
	if err != nil {
		l.Release()
		return false, err
	}
	byID := map[string]store.Node{}
	children := map[string][]string{}
	for _, n := range nodes {
		byID[n.ID] = n
		if n.Parent != "" {
			children[n.Parent] = append(children[n.Parent], n.ID)
		}
	}
	// 1. garbage: bases nothing depends on, and files without a record
	changed := false
	for _, n := range nodes {
		if n.VDI == nil && len(children[n.ID]) == 0 {
			if err := c.deleteNode(n); err != nil {
				l.Release()
				return changed, err
			}
			changed = true
		}
	}
	if removed, err := c.removeOrphans(byID); err != nil {
		l.Release()
		return changed, err
	} else if removed {
		changed = true
	}
	if changed {
		l.Release()
		return true, nil
	}
	// 2. a hidden node that is the only child of its (hidden) parent
	for _, n := range nodes {
		if n.VDI != nil || n.Parent == "" || len(children[n.ID]) == 0 {
			continue
		}
		p, ok := byID[n.Parent]
		if !ok || p.VDI != nil || len(children[p.ID]) != 1 || p.Format != n.Format {
			continue
		}
		j := journal{Node: n.ID, Parent: p.ID, Step: StepJournalled}
		if err := store.WriteJSON(c.journalPath(), j); err != nil {
			l.Release()
			return false, err
		}
		l.Release()
		c.fault(StepJournalled)
		return true, c.runCoalesce(ctx, j)
	}
	// 3. a VDI's leaf that alone uses its hidden parent
	defer l.Release()
	for _, n := range nodes {
		if n.VDI == nil || n.Parent == "" || len(children[n.ID]) != 0 || c.skipped[n.ID] {
			continue
		}
		p, ok := byID[n.Parent]
		if !ok || p.VDI != nil || len(children[p.ID]) != 1 || p.Format != n.Format {
			continue
		}
		done, err := c.startLeafCoalesce(ctx, n, p)
		if err != nil || done {
			return done, err
		}
	}
	return false, nil
}

// startLeafCoalesce journals and runs a leaf-coalesce of n into p (SR lock
// held). It reports false, nil when it skipped n: a VM has it open and it
// is too large to coalesce while paused, or its tapdisk would not pause.
func (c *Collector) startLeafCoalesce(ctx context.Context, n, p store.Node) (bool, error) {
	log := c.Log.WithFields(logrus.Fields{"vol": n.ID, "parent": p.ID})
	j := journal{Kind: kindLeaf, Node: n.ID, Parent: p.ID, Grand: p.Parent, Step: StepJournalled}
	if err := store.WriteJSON(c.journalPath(), j); err != nil {
		return false, err
	}
	c.fault(StepJournalled)
	resume, paused, err := c.pause(ctx, c.Store.ImagePath(n))
	if err != nil {
		log.WithError(err).Warn("skipping the leaf-coalesce of a volume whose VM could not be paused; trying again on the next pass")
		c.skip(n.ID)
		return false, c.dropJournal()
	}
	max := c.LiveLeafMax
	if max == 0 {
		max = DefaultLiveLeafMax
	}
	if used := allocated(c.Store.ImagePath(n)); paused > 0 && used > max {
		log.WithFields(logrus.Fields{"leaf_bytes": used, "max": max}).Info("leaf too large to coalesce while its VM runs; it will be once the VM stops")
		c.skip(n.ID)
		return false, errors.Join(resume(ctx), c.dropJournal())
	}
	return true, c.leafCoalesce(ctx, j, resume)
}

func (c *Collector) skip(id string) {
	if c.skipped == nil {
		c.skipped = map[string]bool{}
	}
	c.skipped[id] = true
}

func (c *Collector) dropJournal() error {
	if err := os.Remove(c.journalPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func allocated(path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0
	}
	return st.Blocks * 512
}

// FinishLeafCoalesce finishes a journalled leaf-coalesce, if one is
// pending (pausing the leaf's tapdisk again). The caller holds the SR
// lock: volume calls run it first, since they must not see the leaf half
// renamed.
func (c *Collector) FinishLeafCoalesce(ctx context.Context) error {
	var j journal
	err := store.ReadJSON(c.journalPath(), &j)
	if errors.Is(err, os.ErrNotExist) || (err == nil && j.Kind != kindLeaf) {
		return nil
	}
	if err != nil {
		return err
	}
	c.Log.WithFields(logrus.Fields{"vol": j.Node, "parent": j.Parent, "step": j.Step}).Warn("finishing an interrupted leaf-coalesce")
	resume, _, err := c.pause(ctx, c.Store.ImagePath(store.Node{ID: j.Node, Format: c.leafFormat(j)}))
	if err != nil {
		return fmt.Errorf("finishing the coalesce of volume %s into its parent: %w", j.Node, err)
	}
	return c.leafCoalesce(ctx, j, resume)
}

func (c *Collector) leafFormat(j journal) string {
	if n, err := c.Store.Get(j.Node); err == nil {
		return n.Format
	}
	return store.FormatVHD
}

// leafCoalesce takes a leaf-coalesce from its journalled step to the end,
// with the leaf's tapdisk paused (resume unpauses it; called in any case).
// Every step is idempotent and the leaf's path holds the whole disk after
// each of them, so a VM unpaused after a crash reads the right data.
func (c *Collector) leafCoalesce(ctx context.Context, j journal, resume func(context.Context) error) (err error) {
	defer func() { err = errors.Join(err, resume(ctx)) }()
	log := c.Log.WithFields(logrus.Fields{"vol": j.Node, "parent": j.Parent})
	n, err := c.Store.Get(j.Node)
	if err != nil {
		return fmt.Errorf("leaf-coalesce journal names volume %s: %w", j.Node, err)
	}
	leaf := c.Store.ImagePath(n)
	parent := c.Store.ImagePath(store.Node{ID: j.Parent, Format: n.Format})
	// The leaf's file is replaced (and its flag rewritten) below, before
	// its record changes: SR.ls must not serve the old one's allocation.
	if err := c.Store.InvalidateAllocation(); err != nil {
		return err
	}
	if j.Step == StepJournalled || j.Step == "" {
		start := time.Now()
		if err := c.Images.Coalesce(ctx, leaf, parent); err != nil {
			return fmt.Errorf("coalescing volume %s into its parent %s: %w", n.ID, j.Parent, err)
		}
		j.Step = StepCopied
		if err := store.WriteJSON(c.journalPath(), j); err != nil {
			return err
		}
		log.WithField("ms", time.Since(start).Milliseconds()).Info("coalesced a leaf into its parent")
		c.fault(StepCopied)
	}
	if j.Step == StepCopied {
		// The parent's file replaces the leaf's (rename is atomic: the
		// leaf's path always holds a whole chain).
		there, err := store.Exists(parent)
		if err != nil {
			return err
		}
		if there {
			if err := durable.Rename(parent, leaf); err != nil {
				return err
			}
		}
		if err := c.Images.Unhide(leaf); err != nil {
			return err
		}
		j.Step = StepRenamed
		if err := store.WriteJSON(c.journalPath(), j); err != nil {
			return err
		}
		c.fault(StepRenamed)
	}
	if j.Step == StepRenamed {
		n.Parent = j.Grand
		if err := c.Store.Put(n); err != nil {
			return err
		}
		if err := c.Store.Delete(j.Parent); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		j.Step = StepRecorded
		if err := store.WriteJSON(c.journalPath(), j); err != nil {
			return err
		}
		c.fault(StepRecorded)
	}
	log.Info("leaf-coalesce finished")
	return c.dropJournal()
}

// runCoalesce takes a journalled coalesce from its recorded step to the end.
func (c *Collector) runCoalesce(ctx context.Context, j journal) error {
	log := c.Log.WithFields(logrus.Fields{"node": j.Node, "parent": j.Parent})
	n, nerr := c.Store.Get(j.Node)
	p, perr := c.Store.Get(j.Parent)
	if j.Step == StepJournalled || j.Step == "" {
		if nerr != nil || perr != nil {
			return fmt.Errorf("coalesce journal names %s into %s, which cannot be read (%v, %v): %w", j.Node, j.Parent, nerr, perr, store.ErrCorrupt)
		}
		// No SR lock and no pause: n and p are hidden internal nodes nobody
		// writes, and readers of chains through n (tapdisks included, which
		// read p through their own cached BAT) see the same data before and
		// after, since n still shadows every block copied. SMAPIv1's
		// cleanup.py coalesces non-leaf nodes live the same way and pauses
		// only to re-link the children, as the next step does.
		if err := c.Images.Coalesce(ctx, c.Store.ImagePath(n), c.Store.ImagePath(p)); err != nil {
			return fmt.Errorf("coalescing %s into %s: %w", n.ID, p.ID, err)
		}
		if n.VirtualSize > p.VirtualSize {
			p.VirtualSize = n.VirtualSize
			if err := c.Store.Put(p); err != nil {
				return err
			}
		}
		j.Step = StepCopied
		if err := store.WriteJSON(c.journalPath(), j); err != nil {
			return err
		}
		log.Info("coalesced blocks into the parent")
		c.fault(StepCopied)
	}
	if j.Step == StepCopied {
		if perr != nil {
			return fmt.Errorf("coalesce journal names parent %s: %w", j.Parent, perr)
		}
		l, err := c.lockSR(ctx)
		if err != nil {
			return err
		}
		// The children are listed now, not at journal time: a snapshot may
		// have renamed a leaf below n into a new base meanwhile.
		nodes, err := c.Store.List()
		if err != nil {
			l.Release()
			return err
		}
		for _, ch := range nodes {
			if ch.Parent != j.Node {
				continue
			}
			// A VM reading through ch must reopen its chain: pause the
			// tapdisks of the leaves below ch (ch itself if a VDI).
			resume, _, err := c.pause(ctx, c.leavesBelow(nodes, ch)...)
			if err != nil {
				l.Release()
				return fmt.Errorf("re-parenting %s onto %s postponed, a VM using it could not be paused: %w", ch.ID, p.ID, err)
			}
			// ch may be a VDI's leaf, whose header is rewritten before
			// its record: no cached allocation of it may be served after
			err = c.Store.InvalidateAllocation()
			if err == nil {
				err = c.Images.Reparent(ctx, c.Store.ImagePath(ch), c.Store.ImagePath(p))
			}
			if err == nil {
				ch.Parent = j.Parent
				err = c.Store.Put(ch)
			}
			if err = errors.Join(err, resume(ctx)); err != nil {
				l.Release()
				return fmt.Errorf("re-parenting %s onto %s: %w", ch.ID, p.ID, err)
			}
		}
		j.Step = StepReparented
		err = store.WriteJSON(c.journalPath(), j)
		l.Release()
		if err != nil {
			return err
		}
		log.Info("re-parented the children")
		c.fault(StepReparented)
	}
	if j.Step == StepReparented {
		l, err := c.lockSR(ctx)
		if err != nil {
			return err
		}
		if nerr == nil {
			err = c.deleteNode(n)
		}
		l.Release()
		if err != nil {
			return err
		}
		j.Step = StepDeleted
		if err := store.WriteJSON(c.journalPath(), j); err != nil {
			return err
		}
		c.fault(StepDeleted)
	}
	if err := os.Remove(c.journalPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	log.Info("coalesce finished")
	return nil
}

// leavesBelow lists the image paths of the VDIs in n's subtree (n
// included): the images a VM may read n through.
func (c *Collector) leavesBelow(nodes []store.Node, n store.Node) []string {
	children := map[string][]store.Node{}
	for _, x := range nodes {
		children[x.Parent] = append(children[x.Parent], x)
	}
	var out []string
	var walk func(store.Node, int)
	walk = func(x store.Node, depth int) {
		if depth > 100 {
			return // a loop in damaged records; the volume layer reports it
		}
		if x.VDI != nil {
			out = append(out, c.Store.ImagePath(x))
		}
		for _, ch := range children[x.ID] {
			walk(ch, depth+1)
		}
	}
	walk(n, 0)
	return out
}

// deleteNode removes a record, then its file (a crash between leaves an
// orphan file, removed by a later pass).
func (c *Collector) deleteNode(n store.Node) error {
	if err := c.Store.Delete(n.ID); err != nil {
		return err
	}
	if err := os.Remove(c.Store.ImagePath(n)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	c.Log.WithField("node", n.ID).Info("deleted unused base copy")
	return nil
}

var imageName = regexp.MustCompile(`^(\.tmp-)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.(vhd|qcow2)$|^\.[0-9a-f-]{36}\.(vhd|qcow2)\.tmp[0-9]*$`)

// removeOrphans deletes image files (and temporary images) that no record
// names. Called with the SR lock held, so no create is half-way.
func (c *Collector) removeOrphans(known map[string]store.Node) (bool, error) {
	entries, err := os.ReadDir(c.Store.SR)
	if err != nil {
		return false, err
	}
	age := c.OrphanAge
	if age == 0 {
		age = 10 * time.Minute
	}
	removed := false
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() || !imageName.MatchString(name) {
			continue
		}
		id := strings.TrimSuffix(strings.TrimSuffix(name, ".vhd"), ".qcow2")
		if _, ok := known[id]; ok {
			continue
		}
		info, err := e.Info()
		if err != nil || time.Since(info.ModTime()) < age {
			continue
		}
		if err := os.Remove(filepath.Join(c.Store.SR, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return removed, err
		}
		c.Log.WithField("file", name).Warn("deleted an image file no volume uses (left by an interrupted operation)")
		removed = true
	}
	return removed, nil
}

// Run collects until nothing changes, then every interval, until ctx ends
// or alive reports the SR gone.
func (c *Collector) Run(ctx context.Context, interval time.Duration, alive func() bool) error {
	for {
		c.skipped = nil // chains skipped last round are tried again
		for ctx.Err() == nil && alive() {
			changed, err := c.Pass(ctx)
			if err != nil {
				c.Log.WithError(err).Error("garbage collection pass failed; retrying later")
				break
			}
			if !changed {
				break
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
		if !alive() {
			c.Log.Info("SR is no longer attached here; garbage collector exits")
			return nil
		}
	}
}

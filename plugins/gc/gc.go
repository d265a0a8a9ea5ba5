// Package gc is the garbage collector of a file SR's snapshot tree: it
// deletes hidden base copies that nothing uses any more, removes image
// files a crashed call left without a record, and coalesces single-child
// chains (the child's blocks into its parent, then the grandchildren
// re-parented), so that chains stay short after snapshots are deleted.
//
// Every coalesce is journalled (<sr>/.luksext/gc/journal.json) and each of
// its steps is idempotent, so a GC killed at any point (kill -9, host
// crash) finishes the job on its next run and loses nothing.
package gc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
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
)

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
}

type journal struct {
	Node   string `json:"node"`
	Parent string `json:"parent"`
	Step   string `json:"step"`
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
		c.Log.WithFields(logrus.Fields{"node": j.Node, "parent": j.Parent, "step": j.Step}).Warn("resuming an interrupted coalesce")
		return true, c.runCoalesce(ctx, j)
	case !errors.Is(err, os.ErrNotExist):
		return false, err
	}

	l, err := c.lockSR(ctx)
	if err != nil {
		return false, err
	}
	pending, err := volumeJournalPending(c.Store)
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
	l.Release()
	return false, nil
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
		// No SR lock: n and p are hidden internal nodes nobody writes, and
		// readers of chains through n see the same data before and after.
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
			if err := c.Images.Reparent(ctx, c.Store.ImagePath(ch), c.Store.ImagePath(p)); err != nil {
				l.Release()
				return fmt.Errorf("re-parenting %s onto %s: %w", ch.ID, p.ID, err)
			}
			ch.Parent = j.Parent
			if err := c.Store.Put(ch); err != nil {
				l.Release()
				return err
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

// volumeJournalPending reports unfinished volume operations (snapshots):
// the tree is half-built until the next volume call finishes them.
func volumeJournalPending(st store.Store) (bool, error) {
	entries, err := os.ReadDir(st.Path("journal"))
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

// Run collects until nothing changes, then every interval, until ctx ends
// or alive reports the SR gone.
func (c *Collector) Run(ctx context.Context, interval time.Duration, alive func() bool) error {
	for {
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

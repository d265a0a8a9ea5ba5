package luksext

import (
	"context"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
)

// snapshotJournal records a snapshot or clone before it touches anything,
// so that a call killed half-way is finished by the next call that takes
// the SR lock (every step below is idempotent).
//
// The "double snapshot" of SMAPIv1's FileSR: the VDI's leaf file <A> is
// renamed to a new hidden base <N>; a new empty leaf <A> (same name, so the
// VDI's key and URI never change) and the snapshot/clone leaf <S> are
// created on top of <N>. VDIs are always leaves; bases are never written.
type snapshotJournal struct {
	VDI        string `json:"vdi"`
	Base       string `json:"base"`
	New        string `json:"new"`
	OrigParent string `json:"orig_parent,omitempty"`
	Clone      bool   `json:"clone"`
}

func journalDir(st store.Store) string { return st.JournalDir() }

// SnapshotSteps are the points of a snapshot or clone passed to
// VolumeDeps.Fault, in order.
var SnapshotSteps = []string{"journalled", "paused", "renamed", "created", "recorded", "unpaused"}

func (v *volumes) fault(step string) {
	if v.d.Fault != nil {
		v.d.Fault(step)
	}
}

func (v *volumes) chainDepth(n store.Node) (int, error) {
	depth := 1
	for p := n.Parent; p != ""; depth++ {
		if depth > 2*MaxChainDepth {
			return 0, fmt.Errorf("%w: chain of %s loops", store.ErrCorrupt, n.ID)
		}
		pn, err := v.st.Get(p)
		if err != nil {
			return 0, fmt.Errorf("reading ancestor %s of %s: %w", p, n.ID, err)
		}
		p = pn.Parent
	}
	return depth, nil
}

func volumeSnapshot(ctx context.Context, d VolumeDeps, p smapi.VolumeParams, clone bool) (smapi.Volume, error) {
	v, a, l, err := openVDI(ctx, d, p.SR, p.Key, true)
	if err != nil {
		return smapi.Volume{}, err
	}
	defer l.Release()
	depth, err := v.chainDepth(a)
	if err != nil {
		return smapi.Volume{}, err
	}
	if depth >= MaxChainDepth {
		return smapi.Volume{}, fmt.Errorf("volume %s already sits on a chain of %d images (limit %d); delete old snapshots and let the SR's garbage collector coalesce them: %w",
			a.ID, depth, MaxChainDepth, ErrChainTooDeep)
	}
	j := snapshotJournal{VDI: a.ID, Base: store.NewID(), New: store.NewID(), OrigParent: a.Parent, Clone: clone}
	jpath := filepath.Join(journalDir(v.st), "snapshot-"+a.ID+".json")
	if err := store.WriteJSON(jpath, j); err != nil {
		return smapi.Volume{}, err
	}
	v.fault("journalled")
	// A running VM's leaf is renamed below: its tapdisk must be paused
	// (live.go). If it cannot be, nothing was changed: drop the journal.
	start := time.Now()
	resume, err := v.pauseLeaf(ctx, a)
	if err != nil {
		return smapi.Volume{}, errors.Join(err, removeJournal(jpath))
	}
	pausedAt := time.Now()
	v.fault("paused")
	err = v.finishSnapshot(ctx, j)
	if rerr := resume(ctx); err == nil {
		err = rerr
	}
	paused := time.Since(pausedAt)
	if err == nil {
		v.fault("unpaused")
	}
	if err != nil {
		return smapi.Volume{}, err
	}
	if err := removeJournal(jpath); err != nil {
		return smapi.Volume{}, err
	}
	s, err := v.st.Get(j.New)
	if err != nil {
		return smapi.Volume{}, err
	}
	what := "snapshot"
	if clone {
		what = "clone"
	}
	v.log.WithFields(logrus.Fields{"vol": a.ID, "new": s.ID, "base": j.Base, "depth": depth + 1,
		"paused_ms": paused.Milliseconds(), "total_ms": time.Since(start).Milliseconds()}).Info(what + " created")
	return v.toVolume(s), nil
}

// finishSnapshot moves the tree from any intermediate state of j to the
// final one.
func (v *volumes) finishSnapshot(ctx context.Context, j snapshotJournal) error {
	a, err := v.st.Get(j.VDI)
	if err != nil {
		return fmt.Errorf("snapshot journal names volume %s: %w", j.VDI, err)
	}
	if a.VDI == nil {
		return fmt.Errorf("snapshot journal names %s, which is not a volume: %w", j.VDI, store.ErrCorrupt)
	}
	base := store.Node{ID: j.Base, Format: a.Format, Parent: j.OrigParent, VirtualSize: a.VirtualSize}
	leaf := v.st.ImagePath(a)
	basePath := v.st.ImagePath(base)
	newNode := store.Node{ID: j.New, Format: a.Format, Parent: j.Base, VirtualSize: a.VirtualSize, VDI: snapshotVDI(a.VDI, j.Clone)}
	newPath := v.st.ImagePath(newNode)
	// The VDI's leaf is renamed away and made anew below: SR.ls must not
	// serve its allocation from before (a crash half way leaves the
	// records as they were, until the next exclusive call finishes).
	if err := v.st.InvalidateAllocation(); err != nil {
		return err
	}

	// 1. the leaf becomes the base (the base name is fresh, so its existence
	//    proves the rename happened)
	baseThere, err := store.Exists(basePath)
	if err != nil {
		return err
	}
	if !baseThere {
		if err := durable.Rename(leaf, basePath); err != nil {
			return fmt.Errorf("renaming %s to base %s: %w", leaf, basePath, err)
		}
		v.fault("renamed")
	}
	if err := v.st.Put(base); err != nil {
		return err
	}
	if err := v.d.Images.SetHidden(basePath); err != nil {
		return err
	}
	// 2. new empty leaves on top of the base (created under temporary names
	//    and renamed, so existing means complete)
	for _, path := range []string{leaf, newPath} {
		there, err := store.Exists(path)
		if err != nil {
			return err
		}
		if !there {
			if err := v.d.Images.Snapshot(ctx, path, basePath); err != nil {
				return fmt.Errorf("creating %s on top of %s: %w", path, basePath, err)
			}
		}
	}
	v.fault("created")
	// 3. records: the new VDI, then the VDI's leaf now under the base
	if err := v.st.Put(newNode); err != nil {
		return err
	}
	a.Parent = j.Base
	if err := v.st.Put(a); err != nil {
		return err
	}
	v.fault("recorded")
	return nil
}

// snapshotVDI is the record of a new snapshot or clone of src. The SMAPIv3
// IDL (xen-api ocaml/xapi-storage/generator/lib/control.ml, Volume.snapshot
// and Volume.clone) copies only the name and description: the keys stored
// with Volume.set belong to the source VDI. xapi-storage-script follows
// clone-on-boot on attach, activate and destroy (ocaml/xapi-storage-script/
// main.ml), so a copied clone-on-boot would serve a snapshot from the
// original VM's transient disk; copied tags, vdi-type and _sm_config_* keys
// are xapi's to set on the new VDI itself. Records written before this
// rule keep their keys and work as they are.
func snapshotVDI(src *store.VDI, clone bool) *store.VDI {
	return &store.VDI{Name: src.Name, Description: src.Description, ReadWrite: clone, Sharable: src.Sharable, Keys: map[string]string{}}
}

// recover finishes journalled operations of crashed calls (snapshots,
// clones, resizes), pausing the leaf's tapdisk again if it serves a VM: a
// call killed between pause and unpause is finished, and unpaused, here.
// Called with the SR lock held exclusively.
func (v *volumes) recover(ctx context.Context) error {
	entries, err := os.ReadDir(journalDir(v.st))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(journalDir(v.st), name)
		switch journalKind(name) {
		case "snapshot":
			var j snapshotJournal
			if err := store.ReadJSON(path, &j); err != nil {
				return fmt.Errorf("reading journal %s: %w", path, err)
			}
			if err := j.validate(); err != nil {
				return fmt.Errorf("snapshot journal %s: %w: %v", path, store.ErrCorrupt, err)
			}
			v.log.WithFields(logrus.Fields{"vol": j.VDI, "journal": name}).Warn("finishing a snapshot interrupted by a crash")
			a, err := v.st.Get(j.VDI)
			if err != nil {
				return smapi.Errorf(smapi.KindNeedsAttention, "cannot finish the interrupted snapshot of volume %s (journal %s): %v", j.VDI, path, err)
			}
			resume, err := v.pauseLeaf(ctx, a)
			if err != nil {
				return err
			}
			err = v.finishSnapshot(ctx, j)
			if rerr := resume(ctx); err == nil {
				err = rerr
			}
			if err != nil {
				return smapi.Errorf(smapi.KindNeedsAttention, "cannot finish the interrupted snapshot of volume %s (journal %s): %v", j.VDI, path, err)
			}
		case "resize":
			var j resizeJournal
			if err := store.ReadJSON(path, &j); err != nil {
				return fmt.Errorf("reading journal %s: %w", path, err)
			}
			if !store.ValidID(j.VDI) || j.Size <= 0 {
				return fmt.Errorf("resize journal %s: %w: vdi %q, size %d", path, store.ErrCorrupt, j.VDI, j.Size)
			}
			v.log.WithFields(logrus.Fields{"vol": j.VDI, "journal": name}).Warn("finishing a resize interrupted by a crash")
			if err := v.finishResize(ctx, j); err != nil {
				return fmt.Errorf("finishing the interrupted resize of volume %s (journal %s): %w", j.VDI, path, err)
			}
		default:
			continue
		}
		if err := removeJournal(path); err != nil {
			return err
		}
	}
	return v.recoverGC(ctx)
}

package luksext

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
)

// Live volumes. tapdisk holds a VM's leaf image open by file descriptor:
// renaming it (snapshot, clone) or rewriting its headers (resize, GC
// re-parent, leaf-coalesce) behind its back would send the VM's writes to
// the wrong file or make it read stale metadata. So every such change is
// bracketed the way SMAPIv1 does it (xcp-ng/sm drivers/blktap2.py,
// VDI.tap_pause/tap_unpause): tap-ctl pause (tapdisk drains I/O and closes
// the image), change, tap-ctl unpause (tapdisk reopens the image by path,
// which is the VDI's new leaf: our leaves keep their file name). The
// operation is journalled before the pause, and the pause itself is
// recorded in the datapath record before tap-ctl runs, so a crash anywhere
// leaves enough for the next volume call, the GC or a Datapath call to
// finish the change and unpause.

// pauseAll pauses the tapdisks serving any of paths (a no-op for images no
// tapdisk has open) and returns the function that unpauses them all. On
// failure the ones already paused are unpaused again.
func pauseAll(ctx context.Context, m *attachment.Manager, log logrus.FieldLogger, paths ...string) (resume func(context.Context) error, paused int, err error) {
	if m == nil {
		return func(context.Context) error { return nil }, 0, nil
	}
	var held []*attachment.Quiesced
	resume = func(ctx context.Context) error {
		var errs []error
		for i := len(held) - 1; i >= 0; i-- {
			errs = append(errs, held[i].Resume(ctx))
		}
		held = nil
		return errors.Join(errs...)
	}
	for _, p := range paths {
		q, err := m.Pause(ctx, p)
		if err != nil {
			if rerr := resume(ctx); rerr != nil {
				log.WithError(rerr).Error("unpausing after a failed pause")
			}
			return nil, 0, err
		}
		held = append(held, q)
		if q.Paused() {
			paused++
		}
	}
	return resume, paused, nil
}

// pauseLeaf pauses the tapdisk serving VDI n's leaf, if any.
func (v *volumes) pauseLeaf(ctx context.Context, n store.Node) (func(context.Context) error, error) {
	resume, _, err := pauseAll(ctx, v.d.Datapath, v.log, v.st.ImagePath(n))
	if err != nil {
		return nil, fmt.Errorf("volume %s is in use by a VM whose disk could not be paused: %w", n.ID, err)
	}
	return resume, nil
}

// resizeJournal records a live resize before the pause.
type resizeJournal struct {
	VDI  string `json:"vdi"`
	Size int64  `json:"size"`
}

func resizeJournalPath(st store.Store, key string) string {
	return filepath.Join(journalDir(st), "resize-"+key+".json")
}

// finishResize grows the image and its record to j.Size with the leaf's
// tapdisk paused (tapdisk learns the new size when it reopens the image).
// Idempotent.
func (v *volumes) finishResize(ctx context.Context, j resizeJournal) error {
	n, err := v.vdi(j.VDI)
	if err != nil {
		return err
	}
	resume, err := v.pauseLeaf(ctx, n)
	if err != nil {
		return err
	}
	// before the leaf changes: SR.ls serves no allocation cached earlier
	err = v.st.InvalidateAllocation()
	if err == nil {
		err = v.d.Images.Resize(ctx, v.st.ImagePath(n), j.Size)
	}
	if err == nil && n.VirtualSize != j.Size {
		n.VirtualSize = j.Size
		err = v.st.Put(n)
	}
	return errors.Join(err, resume(ctx))
}

// recoverForDatapath is the datapath's Recover hook: the tapdisk of the
// image at path was left paused by a volume call that died; finish the
// journalled operations of its SR (which unpause it).
func recoverForDatapath(d VolumeDeps) func(ctx context.Context, path string) error {
	return func(ctx context.Context, path string) error {
		sr := filepath.Dir(path)
		v, err := openVolumes(ctx, d, sr)
		if err != nil {
			return err
		}
		l, err := v.exclusive(ctx)
		if err != nil {
			return err
		}
		l.Release()
		return nil
	}
}

// journalKind returns the kind of a journal file name ("snapshot",
// "resize"), or "" for files that are not journals.
func journalKind(name string) string {
	if !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
		return ""
	}
	kind, _, ok := strings.Cut(name, "-")
	if !ok {
		return ""
	}
	return kind
}

// removeJournal deletes a finished journal.
func removeJournal(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// recoverGC finishes a leaf-coalesce the GC left half done (it renames and
// re-records a VDI's leaf, which no volume call may see half way).
func (v *volumes) recoverGC(ctx context.Context) error {
	c := v.collector(nil)
	return c.FinishLeafCoalesce(ctx)
}

package luksext

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"

	"github.com/luksext/luksext/plugins/durable"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/sr-types/luksext/adopt"
)

// Steps of luksext adopt after which a crash is survivable, in order. A
// test (or LUKSEXT_ADOPT_CRASH_AFTER in the VM tier) kills adopt right
// after one; the rerun must converge to the same SR.
const (
	AdoptStepMetadata = "luks-metadata" // disk metadata {sr, adopting, lvm}
	AdoptStepJournal  = "journal"       // the plan staged in .luksext/adopt.json
	AdoptStepRecords  = "records"       // one store record per VHD
	AdoptStepSRRecord = "sr-record"     // luksext-sr.json
	AdoptStepCommit   = "commit"        // adopt.json removed
	AdoptStepClosed   = "closed"        // unmounted, VG deactivated, mapping closed
	AdoptStepReady    = "ready"         // disk metadata state ready: the adopted marker
)

// AdoptSteps lists the steps in order.
var AdoptSteps = []string{AdoptStepMetadata, AdoptStepJournal, AdoptStepRecords, AdoptStepSRRecord, AdoptStepCommit, AdoptStepClosed, AdoptStepReady}

// adoptJournalPath is the staged plan of an adoption in progress. While it
// exists the SR's files are not all recorded: the GC must not run (it
// would delete the unrecorded VHDs as orphans), see AdoptionPending.
func adoptJournalPath(st store.Store) string { return st.Path("adopt.json") }

// AdoptionPending reports whether the SR mounted at sr is half-way through
// luksext adopt (its journal exists).
func AdoptionPending(sr string) (bool, error) {
	return store.Exists(adoptJournalPath(store.New(sr)))
}

// adoptJournal is what adopt.json holds: everything the commit writes, so
// that a rerun (even without --names) writes the same records.
type adoptJournal struct {
	Schema int        `json:"schema"`
	SR     SRMeta     `json:"sr"`
	Plan   adopt.Plan `json:"plan"`
}

// adoptDisk is the device side of an adoption, behind an interface so the
// order of the commit is tested without root (sr_adopt_steps_test.go).
type adoptDisk interface {
	// Mount activates and mounts the SR's filesystem; returns its root.
	Mount() (string, error)
	// Release unmounts, deactivates the volume group, closes the mapping.
	Release() error
	// SetState writes the disk's luksext metadata with this state.
	SetState(state string) error
}

// adoptRun is one run of the commit, from wherever a crash left it.
type adoptRun struct {
	Disk adoptDisk
	// State is the disk's luksext metadata state at the start: "" (none,
	// a first run) or stateAdopting (a rerun).
	State string
	Meta  SRMeta
	Names map[string]adopt.Names
	// Crash, when set, is called after each step (AdoptSteps).
	Crash func(step string)
}

func (r adoptRun) crash(step string) {
	if r.Crash != nil {
		r.Crash(step)
	}
}

// run carries the adoption to its end and returns the plan it recorded.
// Before AdoptStepMetadata nothing is written: a refusal, an error or a
// crash there leaves the SR as SMAPIv1 left it (e2fsck -p aside).
func (r adoptRun) run() (plan adopt.Plan, err error) {
	if r.State == stateReady {
		return plan, nil // adopted already: nothing to do
	}
	root, err := r.Disk.Mount()
	if err != nil {
		_ = r.Disk.Release()
		return plan, err
	}
	released := false
	defer func() {
		if err != nil && !released {
			_ = r.Disk.Release()
		}
	}()
	st := store.New(root)
	resume := r.State == stateAdopting
	jpath := adoptJournalPath(st)
	var j adoptJournal
	haveJournal := false
	switch jerr := store.ReadJSON(jpath, &j); {
	case jerr == nil:
		haveJournal = true
	case !errors.Is(jerr, os.ErrNotExist):
		return plan, smapi.Wrap(smapi.KindNeedsAttention, jerr)
	}
	srRecord, err := store.Exists(filepath.Join(root, SRMetaFile))
	if err != nil {
		return plan, err
	}
	committed := resume && !haveJournal && srRecord
	scanned, err := adopt.Scan(root, r.Names, resume)
	if err != nil {
		return plan, err
	}
	switch {
	case haveJournal:
		if !samePlanShape(j.Plan, scanned) {
			return plan, smapi.Errorf(smapi.KindNeedsAttention, "the VHD files of SR %s changed since the interrupted adoption staged them (%s); nothing more was changed", r.Meta.UUID, jpath)
		}
		plan = j.Plan
		r.Meta = j.SR
	case committed:
		plan = scanned
		for i, n := range plan.Nodes { // names as recorded
			if rec, gerr := st.Get(n.ID); gerr == nil && rec.VDI != nil {
				plan.Nodes[i].Names = adopt.Names{Name: rec.VDI.Name, Description: rec.VDI.Description, ReadOnly: !rec.VDI.ReadWrite, Sharable: rec.VDI.Sharable}
			}
		}
	default:
		plan = scanned
	}

	if !resume {
		if err := r.Disk.SetState(stateAdopting); err != nil {
			return plan, err
		}
		r.crash(AdoptStepMetadata)
	}
	if !committed {
		if !haveJournal {
			if err := os.MkdirAll(st.Dir(), 0o700); err != nil {
				return plan, err
			}
			if err := store.WriteJSON(jpath, adoptJournal{Schema: 1, SR: r.Meta, Plan: plan}); err != nil {
				return plan, err
			}
			r.crash(AdoptStepJournal)
		}
		for _, n := range plan.Nodes {
			if err := st.Put(n.Record()); err != nil {
				return plan, fmt.Errorf("recording volume %s: %w", n.ID, err)
			}
		}
		r.crash(AdoptStepRecords)
		if err := writeSRMeta(root, r.Meta); err != nil {
			return plan, err
		}
		r.crash(AdoptStepSRRecord)
		if err := os.Remove(jpath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return plan, err
		}
		if err := durable.SyncDir(st.Dir()); err != nil {
			return plan, err
		}
		r.crash(AdoptStepCommit)
	}
	released = true
	if err := r.Disk.Release(); err != nil {
		return plan, err
	}
	r.crash(AdoptStepClosed)
	if err := r.Disk.SetState(stateReady); err != nil {
		return plan, err
	}
	r.crash(AdoptStepReady)
	return plan, nil
}

// samePlanShape: the same files with the same tree and sizes (names may
// differ: they come from the journal).
func samePlanShape(a, b adopt.Plan) bool {
	strip := func(p adopt.Plan) []adopt.Node {
		out := make([]adopt.Node, len(p.Nodes))
		for i, n := range p.Nodes {
			n.Names = adopt.Names{}
			out[i] = n
		}
		return out
	}
	return reflect.DeepEqual(strip(a), strip(b))
}

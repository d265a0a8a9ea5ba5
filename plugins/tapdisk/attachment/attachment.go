// Package attachment serves volumes through tapdisk the way the SMAPIv3
// Datapath interface needs it: every call idempotent, one tapdisk per
// volume shared by all the domains that attached it (refcounted by the
// opaque domain string xapi-storage-script passes), and every multi-step
// change resumable after a crash.
//
// State is one small JSON record per volume in a directory on tmpfs
// (/run/luksext/datapath on a host: tapdisks do not survive a reboot, and
// neither should their records), rewritten atomically after every tap-ctl
// step and protected by a per-volume flock, because xapi-storage-script
// runs calls for the same volume in parallel. The record says what we
// asked for; `tap-ctl list` says what exists. Each call reconciles the two
// before acting, which is what makes a rerun after a crash converge.
package attachment

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"github.com/luksext/luksext/plugins/lock"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/tapdisk"
)

// DefaultDir is where records live on a host.
const DefaultDir = "/run/luksext/datapath"

// Errors a caller can act on.
var (
	// ErrNotAttached: activate for a domain that has not attached the
	// volume, or whose tapdisk has exited since.
	ErrNotAttached = errors.New("volume is not attached for this domain")
	// ErrInUse: the request conflicts with how other domains use the volume.
	ErrInUse = errors.New("volume is in use by another domain")
	// ErrDamagedRecord: a state record cannot be read; an administrator
	// must look (tap-ctl list) before anything is torn down blindly.
	ErrDamagedRecord = errors.New("datapath state record is damaged")
)

// Open modes recorded in Record.OpenMode.
const (
	modeClosed    = ""
	modeReadWrite = "rw"
	modeReadOnly  = "ro"
)

// Domain is one user of a volume.
type Domain struct {
	Active   bool `json:"active"`
	ReadOnly bool `json:"read_only,omitempty"`
}

// Record is the state of one volume's tapdisk.
type Record struct {
	Schema int           `json:"schema"`
	Image  tapdisk.Image `json:"image"`
	// PID is the tapdisk serving the volume; 0 before spawn.
	PID int `json:"pid"`
	// Minor is the blktap minor; -1 before allocate.
	Minor  int    `json:"minor"`
	Device string `json:"device,omitempty"`
	// Attached records a successful tap-ctl attach of Minor to PID.
	Attached bool `json:"attached"`
	// OpenMode is written BEFORE tap-ctl open (write-ahead), so that after
	// a crash in the middle the record knows which mode was asked for;
	// tap-ctl list decides whether it actually happened.
	OpenMode string             `json:"open_mode,omitempty"`
	Domains  map[string]*Domain `json:"domains"`
	// Paused is set before a volume operation pauses the tapdisk and
	// cleared after it unpauses (pause.go).
	Paused *PauseState `json:"paused,omitempty"`
}

func newRecord(img tapdisk.Image) *Record {
	return &Record{Schema: 1, Image: img, Minor: -1, Domains: map[string]*Domain{}}
}

// Manager implements attach/activate/deactivate/detach.
type Manager struct {
	Ctl tapdisk.Ctl
	// Dir holds the records and lock files; DefaultDir when empty.
	Dir string
	Log logrus.FieldLogger
	// PauseTimeout bounds tap-ctl pause (DefaultPauseTimeout when zero).
	PauseTimeout time.Duration
	// Recover, when set, finishes the volume operation that paused the
	// tapdisk of the image at path and died before unpausing it (the
	// volume layer's journals). Called without any datapath lock held.
	Recover func(ctx context.Context, path string) error
	// Closed, when set, runs after the last user's teardown closed the
	// image for good and before its record is removed (the volume layer
	// invalidates the image's cached allocation: tapdisk may have grown
	// it). A crash in between leaves the record, which still counts the
	// image as open (RecordedImages); a failure keeps the record too, and
	// the detach fails, to be retried.
	Closed func(ctx context.Context, img tapdisk.Image) error
}

func (m *Manager) dir() string {
	if m.Dir == "" {
		return DefaultDir
	}
	return m.Dir
}

func (m *Manager) log() logrus.FieldLogger {
	if m.Log == nil {
		return logrus.StandardLogger()
	}
	return m.Log
}

// name is the file name stem of a volume's record: readable, and unique
// because of the hash of the full path.
func name(img tapdisk.Image) string {
	sum := sha256.Sum256([]byte(img.Path))
	return filepath.Base(img.Path) + "-" + hex.EncodeToString(sum[:8])
}

// Attach makes sure a tapdisk serves img's device and records domain as a
// user. It returns the tapdev path. Repeating it is harmless.
func (m *Manager) Attach(ctx context.Context, img tapdisk.Image, domain string) (string, error) {
	v, rec, err := m.settle(ctx, img, true)
	if err != nil {
		return "", err
	}
	defer v.unlock()
	if rec == nil {
		rec = newRecord(img)
	}
	entries, err := m.Ctl.List(ctx)
	if err != nil {
		return "", err
	}
	m.reconcile(rec, entries)
	if rec.PID == 0 {
		pid, err := m.Ctl.Spawn(ctx)
		if err != nil {
			return "", v.saveThen(rec, err)
		}
		rec.PID = pid
		if err := v.save(rec); err != nil {
			return "", err
		}
	}
	if rec.Minor < 0 {
		minor, dev, err := m.Ctl.Allocate(ctx)
		if err != nil {
			return "", err
		}
		rec.Minor, rec.Device = minor, dev
		if err := v.save(rec); err != nil {
			return "", err
		}
	}
	if !rec.Attached {
		if err := m.Ctl.Attach(ctx, rec.PID, rec.Minor); err != nil {
			return "", err
		}
		rec.Attached = true
	}
	if rec.Domains[domain] == nil {
		rec.Domains[domain] = &Domain{}
	}
	if err := v.save(rec); err != nil {
		return "", err
	}
	m.log().WithFields(logrus.Fields{"image": img.Path, "domain": domain, "pid": rec.PID, "minor": rec.Minor, "users": len(rec.Domains)}).Info("attached")
	return rec.Device, nil
}

// Activate opens the image in tapdisk (read-only when readOnly) if it is
// not open yet, and marks domain active.
func (m *Manager) Activate(ctx context.Context, img tapdisk.Image, domain string, readOnly bool) error {
	v, rec, err := m.settle(ctx, img, false)
	if err != nil {
		return err
	}
	if v != nil {
		defer v.unlock()
	}
	if rec == nil || rec.Domains[domain] == nil {
		return fmt.Errorf("%s for domain %q: call Datapath.attach first: %w", img.Path, domain, ErrNotAttached)
	}
	entries, err := m.Ctl.List(ctx)
	if err != nil {
		return err
	}
	m.reconcile(rec, entries)
	if !rec.Attached {
		// Respawning here would give the volume a new device node behind
		// the back of the backend xenopsd already set up on the old one.
		_ = v.save(rec)
		return fmt.Errorf("%s: its tapdisk has exited; detach and attach it again: %w", img.Path, ErrNotAttached)
	}
	want := modeReadWrite
	if readOnly {
		want = modeReadOnly
	}
	if rec.OpenMode == modeReadOnly && want == modeReadWrite {
		if others := rec.activeExcept(domain); len(others) > 0 {
			return fmt.Errorf("%s is open read-only for domain(s) %s and cannot also be activated read-write: %w",
				img.Path, strings.Join(others, ", "), ErrInUse)
		}
		if err := m.Ctl.Close(ctx, rec.PID, rec.Minor); err != nil {
			return err
		}
		rec.OpenMode = modeClosed
	}
	if rec.OpenMode == modeClosed {
		rec.OpenMode = want
		if err := v.save(rec); err != nil {
			return err
		}
		if err := m.Ctl.Open(ctx, rec.PID, rec.Minor, img, tapdisk.OpenOptions{ReadOnly: readOnly}); err != nil {
			rec.OpenMode = modeClosed
			return v.saveThen(rec, err)
		}
	}
	rec.Domains[domain].Active = true
	rec.Domains[domain].ReadOnly = readOnly
	if err := v.save(rec); err != nil {
		return err
	}
	m.log().WithFields(logrus.Fields{"image": img.Path, "domain": domain, "mode": rec.OpenMode}).Info("activated")
	return nil
}

// Deactivate marks domain inactive and closes the image once no domain is
// active. Unknown volumes and domains are not an error.
func (m *Manager) Deactivate(ctx context.Context, img tapdisk.Image, domain string) error {
	v, rec, err := m.settle(ctx, img, false)
	if err != nil || v == nil {
		return err
	}
	defer v.unlock()
	if rec == nil {
		return nil
	}
	for _, d := range rec.match(domain) {
		rec.Domains[d].Active = false
	}
	if len(rec.activeExcept("")) == 0 && rec.OpenMode != modeClosed {
		if err := m.close(ctx, rec); err != nil {
			return v.saveThen(rec, err)
		}
	}
	return v.save(rec)
}

// Detach forgets domain as a user, deactivating it first if needed, and
// tears the tapdisk down when it was the last one. It never fails because
// something is already gone.
func (m *Manager) Detach(ctx context.Context, img tapdisk.Image, domain string) error {
	v, rec, err := m.settle(ctx, img, false)
	if err != nil || v == nil {
		return err
	}
	defer v.unlock()
	if rec == nil {
		return nil
	}
	for _, d := range rec.match(domain) {
		delete(rec.Domains, d)
	}
	if len(rec.Domains) > 0 {
		if len(rec.activeExcept("")) == 0 && rec.OpenMode != modeClosed {
			if err := m.close(ctx, rec); err != nil {
				return v.saveThen(rec, err)
			}
		}
		return v.save(rec)
	}
	if err := m.teardown(ctx, rec, v); err != nil {
		return v.saveThen(rec, err)
	}
	if m.Closed != nil {
		if err := m.Closed(ctx, img); err != nil {
			return v.saveThen(rec, err)
		}
	}
	m.log().WithFields(logrus.Fields{"image": img.Path, "domain": domain}).Info("detached the last user; tapdisk torn down")
	return v.remove()
}

// reconcile corrects rec with what tap-ctl list reports: a tapdisk or
// minor that no longer exists is forgotten, steps that happened but were
// not recorded (a crash between tap-ctl and our write) are recorded.
func (m *Manager) reconcile(rec *Record, entries []tapdisk.Entry) {
	log := m.log().WithField("image", rec.Image.Path)
	if rec.PID != 0 && !hasPID(entries, rec.PID) {
		log.WithField("pid", rec.PID).Warn("recorded tapdisk is gone")
		rec.PID, rec.Attached, rec.OpenMode = 0, false, modeClosed
	}
	if rec.Minor < 0 {
		return
	}
	e, ok := findMinor(entries, rec.Minor)
	switch {
	case !ok:
		log.WithField("minor", rec.Minor).Warn("recorded blktap minor is gone")
		rec.Minor, rec.Device, rec.Attached, rec.OpenMode = -1, "", false, modeClosed
	case e.PID == -1:
		rec.Attached, rec.OpenMode = false, modeClosed
	case e.PID != rec.PID:
		// The minor was freed and reused by someone else's tapdisk.
		log.WithFields(logrus.Fields{"minor": rec.Minor, "owner": e.PID}).Warn("recorded blktap minor now belongs to another tapdisk")
		rec.Minor, rec.Device, rec.Attached, rec.OpenMode = -1, "", false, modeClosed
	default:
		rec.Attached = true
		if !e.Open() {
			rec.OpenMode = modeClosed
		} else if rec.OpenMode == modeClosed {
			// Open but not even the write-ahead mode is recorded: another
			// tool opened it. Read-write is the safe assumption: it makes
			// a later read-write activate reuse it rather than fail.
			rec.OpenMode = modeReadWrite
		}
	}
}

// close closes the image if tap-ctl still shows it open.
func (m *Manager) close(ctx context.Context, rec *Record) error {
	err := m.Ctl.Close(ctx, rec.PID, rec.Minor)
	if err != nil && m.stillThere(ctx, rec, func(e tapdisk.Entry) bool { return e.PID == rec.PID && e.Open() }) {
		return err
	}
	rec.OpenMode = modeClosed
	return nil
}

// teardown undoes attach step by step, recording progress, and treats
// every step whose object is already gone as done.
func (m *Manager) teardown(ctx context.Context, rec *Record, v *volumeLock) error {
	entries, err := m.Ctl.List(ctx)
	if err != nil {
		return err
	}
	m.reconcile(rec, entries)
	if rec.OpenMode != modeClosed {
		if err := m.close(ctx, rec); err != nil {
			return err
		}
		if err := v.save(rec); err != nil {
			return err
		}
	}
	if rec.Attached {
		err := m.Ctl.Detach(ctx, rec.PID, rec.Minor)
		if err != nil && m.stillThere(ctx, rec, func(e tapdisk.Entry) bool { return e.PID == rec.PID }) {
			return err
		}
		rec.Attached = false
		if err := v.save(rec); err != nil {
			return err
		}
	}
	if rec.Minor >= 0 {
		err := m.Ctl.Free(ctx, rec.Minor)
		if err != nil && m.stillThere(ctx, rec, func(tapdisk.Entry) bool { return true }) {
			return err
		}
		rec.Minor, rec.Device = -1, ""
	}
	if rec.PID != 0 {
		// tapdisk exits by itself once it serves no device; a spawned one
		// that never got a device (crash before allocate) is left to the
		// administrator rather than killed by pid, which could be reused.
		if entries, err := m.Ctl.List(ctx); err == nil && hasPID(entries, rec.PID) {
			m.log().WithFields(logrus.Fields{"image": rec.Image.Path, "pid": rec.PID}).Warn("tapdisk still running after its last device was detached")
		}
		rec.PID = 0
	}
	return nil
}

// stillThere re-lists after a failed step and reports whether rec's minor
// still matches cond: if not, the step's object is gone and the failure
// only said so.
func (m *Manager) stillThere(ctx context.Context, rec *Record, cond func(tapdisk.Entry) bool) bool {
	entries, err := m.Ctl.List(ctx)
	if err != nil {
		return true
	}
	e, ok := findMinor(entries, rec.Minor)
	return ok && cond(e)
}

// match returns the recorded domains a deactivate/detach for domain
// applies to. xenopsd passes "" when the guest's domid is already gone
// during teardown (xen-api ocaml/xenopsd/lib/storage.ml vm_of_domid); it then means the one guest domain
// using the volume, if there is exactly one, so its tapdisk is not leaked.
func (r *Record) match(domain string) []string {
	if _, ok := r.Domains[domain]; ok {
		return []string{domain}
	}
	if domain != "" {
		return nil
	}
	var guests []string
	for d := range r.Domains {
		if !strings.HasPrefix(d, "u0") && d != "0" {
			guests = append(guests, d)
		}
	}
	if len(guests) == 1 {
		return guests
	}
	return nil
}

// activeExcept lists the active domains other than domain, sorted.
func (r *Record) activeExcept(domain string) []string {
	var out []string
	for d, st := range r.Domains {
		if st.Active && d != domain {
			out = append(out, d)
		}
	}
	sort.Strings(out)
	return out
}

func hasPID(entries []tapdisk.Entry, pid int) bool {
	for _, e := range entries {
		if e.PID == pid {
			return true
		}
	}
	return false
}

func findMinor(entries []tapdisk.Entry, minor int) (tapdisk.Entry, bool) {
	for _, e := range entries {
		if e.Minor == minor {
			return e, true
		}
	}
	return tapdisk.Entry{}, false
}

// volumeLock is a held lock on one volume's datapath record.
type volumeLock struct {
	l    *lock.Lock
	path string // the record
}

// lock takes the volume's lock, waiting as long as ctx allows. With create
// false and no state directory at all, nothing can be attached: it returns
// a nil lock and no error, so deactivate/detach on a fresh host touch
// nothing.
func (m *Manager) lock(ctx context.Context, img tapdisk.Image, create bool) (*volumeLock, error) {
	dir := m.dir()
	if create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("creating datapath state directory: %w", err)
		}
	} else if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	stem := filepath.Join(dir, name(img))
	// Lock files are never removed: removing one while another process
	// waits on it would let two holders lock different inodes.
	l, err := lock.Acquire(ctx, stem+".lock", lock.Exclusive, m.log())
	if err != nil {
		return nil, fmt.Errorf("datapath lock of %s: %w", img.Path, err)
	}
	return &volumeLock{l: l, path: stem + ".json"}, nil
}

func (v *volumeLock) unlock() { _ = v.l.Release() }

// load returns the record, or nil if there is none.
func (v *volumeLock) load() (*Record, error) {
	b, err := os.ReadFile(v.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", v.path, err)
	}
	rec := &Record{}
	if err := json.Unmarshal(b, rec); err != nil || rec.Schema != 1 {
		return nil, fmt.Errorf("%s (check `tap-ctl list`, then remove it): %w", v.path, ErrDamagedRecord)
	}
	if rec.Domains == nil {
		rec.Domains = map[string]*Domain{}
	}
	return rec, nil
}

// save replaces the record atomically: a crash leaves the old or the new
// one, never a torn one (the fsyncs cost nothing on the tmpfs it lives on).
func (v *volumeLock) save(rec *Record) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	if err := durable.WriteFile(v.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing datapath state: %w", err)
	}
	return nil
}

// saveThen records progress made before a failure and returns the failure.
func (v *volumeLock) saveThen(rec *Record, cause error) error {
	if err := v.save(rec); err != nil {
		return errors.Join(cause, err)
	}
	return cause
}

func (v *volumeLock) remove() error {
	if err := os.Remove(v.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing datapath state: %w", err)
	}
	return nil
}

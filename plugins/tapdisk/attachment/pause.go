package attachment

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/tapdisk"
)

// ErrPauseFailed: the tapdisk serving a volume did not pause (in time).
// Nothing was changed and it was left running.
var ErrPauseFailed = errors.New("the tapdisk serving the volume did not pause")

// ErrStalePause: a call that paused a tapdisk died before unpausing it and
// the image cannot be reopened as it is; the volume call that finishes the
// interrupted operation unpauses it.
var ErrStalePause = errors.New("the tapdisk serving the volume was left paused by an interrupted operation")

// DefaultPauseTimeout bounds tap-ctl pause: tapdisk drains the requests
// in flight first, which on a healthy host takes milliseconds.
const DefaultPauseTimeout = 30 * time.Second

// PauseState is written to the record BEFORE tap-ctl pause (write-ahead):
// if the pausing process dies, whoever next takes the volume's lock sees
// it and makes sure the tapdisk is unpaused.
type PauseState struct {
	Since time.Time `json:"since"`
}

// Quiesced is a volume whose tapdisk (if any has it open) is paused. It
// holds the volume's datapath lock, so no Datapath call changes the
// tapdisk meanwhile; Resume unpauses and releases.
type Quiesced struct {
	m      *Manager
	v      *volumeLock
	rec    *Record
	paused bool
}

// Paused reports whether a tapdisk was actually paused (false: nothing
// serves the volume, so nothing needed pausing).
func (q *Quiesced) Paused() bool { return q != nil && q.paused }

func (m *Manager) pauseTimeout() time.Duration {
	if m.PauseTimeout > 0 {
		return m.PauseTimeout
	}
	return DefaultPauseTimeout
}

// Pause pauses the tapdisk serving the image at path, if one has it open,
// and returns the handle that unpauses it. A tapdisk already paused by a
// call that died is taken over as is. When tapdisk does not pause within
// PauseTimeout, Pause makes sure it runs on (unpause if it half-paused),
// clears the record and fails with ErrPauseFailed.
func (m *Manager) Pause(ctx context.Context, path string) (*Quiesced, error) {
	img := tapdisk.Image{Path: path}
	// create: the lock is held even for a volume no tapdisk serves, so
	// that no Datapath.attach/activate opens it while it changes.
	v, err := m.lock(ctx, img, true)
	if err != nil {
		// a state directory we may not create (not root): then no
		// datapath on this host can have created one either
		if v, err = m.lock(ctx, img, false); err != nil {
			return nil, err
		}
	}
	q := &Quiesced{m: m, v: v}
	if v == nil {
		return q, nil
	}
	rec, err := v.load()
	if err != nil || rec == nil {
		if err != nil {
			v.unlock()
			return nil, err
		}
		return q, nil
	}
	q.rec = rec
	entries, err := m.Ctl.List(ctx)
	if err != nil {
		v.unlock()
		return nil, err
	}
	m.reconcile(rec, entries)
	log := m.log().WithFields(logrus.Fields{"image": path, "pid": rec.PID, "minor": rec.Minor})
	if !rec.Attached || rec.OpenMode == modeClosed {
		if rec.Paused != nil {
			rec.Paused = nil
			if err := v.save(rec); err != nil {
				v.unlock()
				return nil, err
			}
		}
		return q, nil
	}
	if e, ok := findMinor(entries, rec.Minor); ok && e.Paused() {
		// paused by a call that died before unpausing: ours now
		log.Warn("tapdisk found paused by an interrupted operation; taking it over")
		if rec.Paused == nil {
			rec.Paused = &PauseState{Since: time.Now().UTC()}
			if err := v.save(rec); err != nil {
				v.unlock()
				return nil, err
			}
		}
		q.paused = true
		return q, nil
	}
	rec.Paused = &PauseState{Since: time.Now().UTC()}
	if err := v.save(rec); err != nil {
		v.unlock()
		return nil, err
	}
	start := time.Now()
	if perr := m.Ctl.Pause(ctx, rec.PID, rec.Minor, m.pauseTimeout()); perr != nil {
		// It may have paused after all, or be half way (pause requested).
		if entries, lerr := m.Ctl.List(ctx); lerr == nil {
			if e, ok := findMinor(entries, rec.Minor); ok && e.Paused() {
				if uerr := m.Ctl.Unpause(ctx, rec.PID, rec.Minor, nil); uerr != nil {
					log.WithError(uerr).Error("tapdisk half-paused and refused to unpause; leaving the record for the next call")
					v.unlock()
					return nil, fmt.Errorf("tapdisk %d (minor %d) serving %s: %w within %s, and unpausing it failed too: %w",
						rec.PID, rec.Minor, path, ErrPauseFailed, m.pauseTimeout(), errors.Join(perr, uerr))
				}
			}
		}
		rec.Paused = nil
		serr := v.save(rec)
		v.unlock()
		return nil, errors.Join(fmt.Errorf("tapdisk %d (minor %d) serving %s: %w within %s; nothing was changed and the VM keeps running: %w",
			rec.PID, rec.Minor, path, ErrPauseFailed, m.pauseTimeout(), perr), serr)
	}
	log.WithField("pause_ms", time.Since(start).Milliseconds()).Debug("tapdisk paused")
	q.paused = true
	return q, nil
}

// Resume unpauses the tapdisk (reopening the image at the same path, i.e.
// whatever file has that name now) and releases the lock. On failure the
// record keeps the pause, so the next call on the volume retries.
func (q *Quiesced) Resume(ctx context.Context) error {
	if q == nil || q.v == nil {
		return nil
	}
	defer q.v.unlock()
	if !q.paused {
		return nil
	}
	if err := q.m.unpause(ctx, q.v, q.rec); err != nil {
		return err
	}
	q.paused = false
	return nil
}

func (m *Manager) unpause(ctx context.Context, v *volumeLock, rec *Record) error {
	err := m.Ctl.Unpause(ctx, rec.PID, rec.Minor, nil)
	if err != nil && m.stillThere(ctx, rec, func(e tapdisk.Entry) bool { return e.PID == rec.PID && e.Paused() }) {
		return fmt.Errorf("unpausing tapdisk %d (minor %d) serving %s: %w", rec.PID, rec.Minor, rec.Image.Path, err)
	}
	rec.Paused = nil
	return v.save(rec)
}

// settle is the prologue of every Datapath call: a record that says
// "paused" while we hold its lock was left by a call that died between
// pause and unpause. The operation it interrupted is finished first
// (Recover: the volume layer's journals, which unpause), and if the pause
// is still there the tapdisk is unpaused here, provided its image is whole
// at that path. It returns the lock and record like lock+load.
func (m *Manager) settle(ctx context.Context, img tapdisk.Image, create bool) (*volumeLock, *Record, error) {
	for attempt := 0; ; attempt++ {
		v, err := m.lock(ctx, img, create)
		if err != nil || v == nil {
			return v, nil, err
		}
		rec, err := v.load()
		if err != nil || rec == nil || rec.Paused == nil {
			if err != nil {
				v.unlock()
				return nil, nil, err
			}
			return v, rec, nil
		}
		log := m.log().WithFields(logrus.Fields{"image": img.Path, "pid": rec.PID, "minor": rec.Minor})
		if attempt == 0 && m.Recover != nil {
			v.unlock() // the recovery pauses/unpauses under this lock itself
			log.Warn("tapdisk left paused by an interrupted operation; finishing that operation")
			if err := m.Recover(ctx, img.Path); err != nil {
				log.WithError(err).Warn("could not finish the interrupted operation")
			}
			continue
		}
		if _, err := os.Stat(img.Path); err != nil {
			v.unlock()
			return nil, nil, fmt.Errorf("%s: %w; the next volume call on SR %s finishes it (%v)", img.Path, ErrStalePause, filepath.Dir(img.Path), err)
		}
		entries, err := m.Ctl.List(ctx)
		if err != nil {
			v.unlock()
			return nil, nil, err
		}
		m.reconcile(rec, entries)
		if e, ok := findMinor(entries, rec.Minor); ok && e.PID == rec.PID && e.Paused() {
			if err := m.unpause(ctx, v, rec); err != nil {
				v.unlock()
				return nil, nil, err
			}
			log.Warn("unpaused a tapdisk left paused by an interrupted operation")
		} else {
			rec.Paused = nil
			if err := v.save(rec); err != nil {
				v.unlock()
				return nil, nil, err
			}
		}
		return v, rec, nil
	}
}

package operator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"
	"time"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// keyJournal records a key change before it touches the header: the
// keyslot about to be added (New, -1 for none) and the keyslots to remove
// once it is proven (Old). With it, settle can tell a half-made keyslot of
// ours (its passphrase died with the crashed process) from a person's
// passphrase keyslot, and finish or undo the change.
type keyJournal struct {
	Op       string `json:"op"`
	LUKSUUID string `json:"luks_uuid"`
	Device   string `json:"device"`
	New      int    `json:"new_keyslot"`
	Old      []int  `json:"old_keyslots"`
	// NewIsPassphrase: New holds a person's passphrase, which a rerun
	// cannot check, so an unfinished change is undone rather than finished.
	NewIsPassphrase bool      `json:"new_is_passphrase"`
	Started         time.Time `json:"started"`
}

func (a *admin) journalPath(t target) string {
	return filepath.Join(a.JournalDir, t.Info.UUID+".json")
}

func (a *admin) readJournal(t target) (keyJournal, bool, error) {
	data, err := os.ReadFile(a.journalPath(t))
	if errors.Is(err, os.ErrNotExist) {
		return keyJournal{}, false, nil
	}
	if err != nil {
		return keyJournal{}, false, fmt.Errorf("reading the key change journal: %w", err)
	}
	var j keyJournal
	if err := json.Unmarshal(data, &j); err != nil {
		return keyJournal{}, false, smapi.Errorf(smapi.KindNeedsAttention, "the key change journal %s is damaged (%v); check 'luksext status' and remove the file", a.journalPath(t), err)
	}
	return j, true, nil
}

func (a *admin) writeJournal(t target, j keyJournal) error {
	if err := os.MkdirAll(a.JournalDir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", a.JournalDir, err)
	}
	j.LUKSUUID, j.Device, j.Started = t.Info.UUID, t.Dev, time.Now().UTC()
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	return durable.WriteFile(a.journalPath(t), data, 0o600)
}

func (a *admin) dropJournal(t target) error {
	if err := os.Remove(a.journalPath(t)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the key change journal: %w", err)
	}
	return nil
}

// settled says what settle did, for the verb's answer.
type settled struct {
	Op       string `json:"op"`
	Outcome  string `json:"outcome"` // "finished" or "undone"
	New      int    `json:"new_keyslot"`
	Old      []int  `json:"old_keyslots"`
	finished bool
}

// settle finishes or undoes a key change a crash cut short. Every
// key-changing verb calls it first, under the SR lock. The rule: the old
// keyslots go only once the new one is proven; a new keyslot that cannot
// be proven goes instead - never both, so one way in always remains.
func (a *admin) settle(ctx context.Context, t *target) (*settled, error) {
	j, ok, err := a.readJournal(*t)
	if err != nil || !ok {
		return nil, err
	}
	log := smapi.Logger(ctx).WithFields(map[string]any{"dev": t.Dev, "op": j.Op, "new_keyslot": j.New, "old_keyslots": j.Old})
	oldLeft := false
	for _, o := range j.Old {
		oldLeft = oldLeft || hasKeyslot(t.Info, o)
	}
	res := &settled{Op: j.Op, New: j.New, Old: j.Old}
	switch {
	case j.New < 0 || (hasKeyslot(t.Info, j.New) && !oldLeft):
		// A pure removal, or the new keyslot is in and the old ones are
		// already gone: finish the removals.
		res.Outcome, res.finished = "finished", true
	case !hasKeyslot(t.Info, j.New):
		// Nothing was added: the old keyslots were never touched.
		res.Outcome = "undone"
	case j.NewIsPassphrase:
		res.Outcome = "undone"
	default:
		b, bound := bindingOf(t.Info, j.New)
		if bound && a.verifyBinding(ctx, t.Dev, b) == nil {
			res.Outcome, res.finished = "finished", true
		} else {
			res.Outcome = "undone"
		}
	}
	if res.finished {
		for _, o := range j.Old {
			if err := a.removeSlot(ctx, t.Dev, o); err != nil {
				return nil, err
			}
		}
	} else if j.New >= 0 {
		if err := a.removeSlot(ctx, t.Dev, j.New); err != nil {
			return nil, err
		}
	}
	if err := a.dropJournal(*t); err != nil {
		return nil, err
	}
	log.WithField("outcome", res.Outcome).Warn("settled a key change that was interrupted")
	return res, a.refresh(t)
}

// removeSlot removes a keyslot's binding, then the keyslot. The binding
// goes first so that no token ever names a missing keyslot.
func (a *admin) removeSlot(ctx context.Context, dev string, slot int) error {
	if err := a.LUKS.Unbind(ctx, dev, slot); err != nil {
		return fmt.Errorf("removing the binding of keyslot %d: %w", slot, err)
	}
	return a.LUKS.RemoveKeyslot(ctx, dev, slot)
}

// verifyBinding proves a binding unlocks its keyslot: unseal, then test
// the passphrase against that keyslot only. Nothing is opened.
func (a *admin) verifyBinding(ctx context.Context, dev string, b luks.Binding) error {
	pass, err := a.Keys.Decrypt(ctx, b.JWE)
	if err != nil {
		return err
	}
	defer pass.Wipe()
	return a.LUKS.TestKeyslot(ctx, dev, pass, b.Keyslot)
}

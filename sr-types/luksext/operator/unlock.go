package operator

import (
	"context"
	"errors"
	"fmt"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// unlockReport is `luksext unlock`.
type unlockReport struct {
	SR      string `json:"sr_uuid,omitempty"`
	Device  string `json:"device"`
	Mapping string `json:"mapping"`
	Changed bool   `json:"changed"`
	Message string `json:"message"`
}

func (u unlockReport) Text() string { return u.Message + "\n" }

// unlock opens the SR's mapping with the recovery passphrase. SR.attach
// treats an open mapping as unlocked (unlockDevice), so the next
// xe pbd-plug needs nobody. One attempt: a wrong passphrase is an error,
// not a prompt loop.
func (a *admin) unlock(ctx context.Context) (report, error) {
	t, err := a.resolve(a.opts.Args[0])
	if err != nil {
		return nil, err
	}
	release, err := a.lock(ctx, t)
	if err != nil {
		return nil, err
	}
	defer release()
	r := unlockReport{SR: t.SRUUID, Device: t.Dev, Mapping: a.LUKS.MapperPath(t.Name)}
	next := "plug the SR (xe pbd-plug, or SR.attach)"
	if t.SRUUID == "" {
		next = "mount it"
	}
	if a.LUKS.IsOpen(t.Name) {
		r.Message = fmt.Sprintf("%s is already unlocked as %s; %s.", t.describe(), r.Mapping, next)
		return r, nil
	}
	if len(passphraseSlots(t.Info)) == 0 {
		return nil, smapi.Errorf(smapi.KindKeyUnavailable, "%s has no recovery passphrase keyslot; only its clevis bindings can open it (see 'luksext status')", t.describe())
	}
	pass, err := a.askPassphrase(fmt.Sprintf("Recovery passphrase for %s: ", t.describe()))
	if err != nil {
		if errors.Is(err, ErrNoTerminal) {
			return nil, smapi.Wrap(smapi.KindKeyUnavailable, err)
		}
		return nil, err
	}
	defer pass.Wipe()
	if err := a.LUKS.Open(ctx, t.Dev, t.Name, pass, -1); err != nil {
		if errors.Is(err, luks.ErrWrongPassphrase) {
			return nil, smapi.Errorf(smapi.KindWrongPassphrase, "the passphrase opens no keyslot of %s; the disk stays locked (check the keyboard layout; it is not retried)", t.describe())
		}
		return nil, fmt.Errorf("opening %s: %w", t.describe(), err)
	}
	smapi.Logger(ctx).WithField("dev", t.Dev).Warn("unlocked by an administrator with the recovery passphrase")
	r.Changed = true
	r.Message = fmt.Sprintf("%s unlocked as %s. Now %s; then make automatic unlock work again: 'luksext status', 'luksext rebind %s SLOT'.", t.describe(), r.Mapping, next, t.Arg)
	return r, nil
}

package operator

import (
	"context"
	"errors"
	"fmt"
	"github.com/luksext/luksext/sr-types/luksext"
	"strconv"
	"strings"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/smapi"
)

// keyChange is the answer of bind, unbind, rebind and recovery *.
type keyChange struct {
	SR           string      `json:"sr_uuid,omitempty"`
	Device       string      `json:"device"`
	Action       string      `json:"action"`
	Changed      bool        `json:"changed"`
	NewKeyslot   *int        `json:"new_keyslot,omitempty"`
	OldKeyslots  []int       `json:"removed_keyslots,omitempty"`
	Policy       *policyView `json:"policy,omitempty"`
	AuthorisedBy string      `json:"authorised_by,omitempty"`
	Settled      *settled    `json:"settled_interrupted_change,omitempty"`
	Message      string      `json:"message"`
}

func (k keyChange) Text() string {
	var b strings.Builder
	if k.Settled != nil {
		fmt.Fprintf(&b, "An interrupted %s was %s first.\n", k.Settled.Op, k.Settled.Outcome)
	}
	b.WriteString(k.Message + "\n")
	return b.String()
}

func intp(i int) *int { return &i }

// keyVerb opens a key-changing verb: resolve, lock, settle.
func (a *admin) keyVerb(ctx context.Context) (target, func(), *settled, error) {
	t, err := a.resolve(a.opts.Args[0])
	if err != nil {
		return target{}, nil, nil, err
	}
	unlock, err := a.lock(ctx, t)
	if err != nil {
		return target{}, nil, nil, err
	}
	if err := a.refresh(&t); err != nil {
		unlock()
		return target{}, nil, nil, err
	}
	st, err := a.settle(ctx, &t)
	if err != nil {
		unlock()
		return target{}, nil, nil, err
	}
	return t, unlock, st, nil
}

// probe is one binding and whether it unseals and opens its keyslot now.
type probe struct {
	Binding luks.Binding
	Policy  policyView
	Err     error
}

// probeBindings dry-runs every binding (unseal + test its keyslot).
func (a *admin) probeBindings(ctx context.Context, t target) []probe {
	var out []probe
	for _, b := range t.Info.Bindings {
		p := probe{Binding: b}
		if _, v, err := policyOf(b.JWE); err == nil {
			p.Policy = v
		} else {
			p.Policy = policyView{Pin: "unreadable"}
		}
		p.Err = a.verifyBinding(ctx, t.Dev, b)
		out = append(out, p)
	}
	return out
}

func working(ps []probe, except int) int {
	n := 0
	for _, p := range ps {
		if p.Err == nil && p.Binding.Keyslot != except {
			n++
		}
	}
	return n
}

// authorise returns a passphrase that opens a keyslot of t: from the first
// binding that unseals, else the recovery passphrase, tried once.
func (a *admin) authorise(ctx context.Context, t target) (secret.Bytes, string, error) {
	pass, what, _, err := a.authoriseSlot(ctx, t)
	return pass, what, err
}

// authoriseSlot is authorise that also says which keyslot the passphrase
// opens (so that opening the disk tries that one keyslot only).
func (a *admin) authoriseSlot(ctx context.Context, t target) (secret.Bytes, string, int, error) {
	log := smapi.Logger(ctx).WithField("dev", t.Dev)
	var failures []string
	for _, b := range t.Info.Bindings {
		what := luksext.DescribeBinding(b)
		pass, err := a.Keys.Decrypt(ctx, b.JWE)
		if err == nil {
			if err = a.LUKS.TestKeyslot(ctx, t.Dev, pass, b.Keyslot); err == nil {
				log.WithField("keyslot", b.Keyslot).Info("authorised by " + what)
				return pass, what, b.Keyslot, nil
			}
			pass.Wipe()
		}
		failures = append(failures, fmt.Sprintf("%s: %v", what, err))
	}
	slots := passphraseSlots(t.Info)
	why := "no binding unseals (" + strings.Join(failures, "; ") + ")"
	if len(failures) == 0 {
		why = "the disk has no clevis binding"
	}
	if len(slots) == 0 {
		return secret.Bytes{}, "", -1, smapi.Errorf(smapi.KindKeyUnavailable, "%s: %s, and it has no passphrase keyslot", t.describe(), why)
	}
	pass, err := a.askPassphrase(fmt.Sprintf("%s; recovery passphrase for %s: ", why, t.describe()))
	if err != nil {
		if errors.Is(err, ErrNoTerminal) {
			return secret.Bytes{}, "", -1, smapi.Wrap(smapi.KindKeyUnavailable, fmt.Errorf("%s: %s, and no passphrase was given: %w", t.describe(), why, err))
		}
		return secret.Bytes{}, "", -1, err
	}
	slot, err := a.passphraseSlot(ctx, t, pass, slots)
	if err != nil {
		pass.Wipe()
		return secret.Bytes{}, "", -1, err
	}
	log.WithField("keyslot", slot).Info("authorised by the recovery passphrase")
	return pass, fmt.Sprintf("recovery passphrase (keyslot %d)", slot), slot, nil
}

// passphraseSlot finds which of slots pass opens. Each keyslot is tested
// once; a wrong passphrase is not retried (no loop that would let a script
// guess, and nothing that touches the TPM's dictionary-attack counter).
func (a *admin) passphraseSlot(ctx context.Context, t target, pass secret.Bytes, slots []int) (int, error) {
	for _, s := range slots {
		err := a.LUKS.TestKeyslot(ctx, t.Dev, pass, s)
		if err == nil {
			return s, nil
		}
		if !errors.Is(err, luks.ErrWrongPassphrase) {
			return 0, err
		}
	}
	return 0, smapi.Errorf(smapi.KindWrongPassphrase, "the passphrase opens no keyslot of %s; nothing was changed (check the keyboard layout; it is not retried)", t.describe())
}

func (a *admin) askPassphrase(prompt string) (secret.Bytes, error) {
	if a.opts.KeyFile != "" {
		return readKeyFile(a.context(), a.opts.KeyFile, a.inv.Stdin)
	}
	if a.Terminal == nil {
		return secret.Bytes{}, fmt.Errorf("%w: use --key-file -", ErrNoTerminal)
	}
	return a.Terminal.ReadSecret(prompt)
}

// askNewPassphrase reads the new recovery passphrase: from --new-key-file
// or typed twice.
func (a *admin) askNewPassphrase(what string) (secret.Bytes, error) {
	if a.opts.KeyFile == "-" && a.opts.NewKeyFile == "-" {
		return secret.Bytes{}, usageErr("--key-file and --new-key-file cannot both read stdin")
	}
	var p secret.Bytes
	var err error
	if a.opts.NewKeyFile != "" {
		p, err = readKeyFile(a.context(), a.opts.NewKeyFile, a.inv.Stdin)
	} else {
		if a.Terminal == nil {
			return secret.Bytes{}, fmt.Errorf("%w: use --new-key-file", ErrNoTerminal)
		}
		if p, err = a.Terminal.ReadSecret("New " + what + ": "); err == nil {
			again, err2 := a.Terminal.ReadSecret("Type it again: ")
			same := err2 == nil && again.Equal(p)
			again.Wipe()
			if err2 != nil {
				p.Wipe()
				return secret.Bytes{}, err2
			}
			if !same {
				p.Wipe()
				return secret.Bytes{}, usageErr("the two passphrases differ; nothing was changed")
			}
		}
	}
	if err != nil {
		return secret.Bytes{}, err
	}
	if p.Len() < 8 {
		p.Wipe()
		return secret.Bytes{}, usageErr("the %s must be at least 8 characters long", what)
	}
	return p, nil
}

func parseSlot(s string, info luks.Info) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 31 {
		return 0, usageErr("SLOT must be a keyslot number, got %q", s)
	}
	if !hasKeyslot(info, n) {
		return 0, smapi.Errorf(smapi.KindDeviceNotFound, "keyslot %d is not in use ('luksext status' lists the keyslots)", n)
	}
	return n, nil
}

// sealNew adds a keyslot sealed with cfg, proves it, then removes old:
// seal (a TPM that refuses fails before the disk is touched) → journal →
// add keyslot → store binding → unseal the new JWE and test its keyslot →
// remove old → drop journal.
func (a *admin) sealNew(ctx context.Context, t target, existing secret.Bytes, cfg clevis.Config, op string, old []int) (int, error) {
	pass, err := luks.NewKeyslotPassphrase()
	if err != nil {
		return 0, err
	}
	defer pass.Wipe()
	jwe, err := a.Keys.Encrypt(ctx, cfg, pass)
	if err != nil {
		return 0, fmt.Errorf("sealing the new key: %w", err)
	}
	slot, err := a.LUKS.FreeKeyslot(t.Dev)
	if err != nil {
		return 0, err
	}
	if err := a.writeJournal(t, keyJournal{Op: op, New: slot, Old: old}); err != nil {
		return 0, err
	}
	undo := func(cause error) (int, error) { return 0, a.undoAdd(ctx, t, slot, cause) }
	if _, err := a.LUKS.AddKeyslot(ctx, t.Dev, existing, pass, slot, luks.MinimalKDF()); err != nil {
		return undo(err)
	}
	if err := a.LUKS.Bind(ctx, t.Dev, slot, jwe); err != nil {
		return undo(fmt.Errorf("storing the binding of keyslot %d: %w", slot, err))
	}
	if err := a.verifyBinding(ctx, t.Dev, luks.Binding{Keyslot: slot, JWE: jwe}); err != nil {
		return undo(fmt.Errorf("the new binding does not unlock keyslot %d: %w", slot, err))
	}
	for _, o := range old {
		if err := a.removeSlot(ctx, t.Dev, o); err != nil {
			return 0, fmt.Errorf("the new keyslot %d works, but removing keyslot %d failed (rerun to finish): %w", slot, o, err)
		}
	}
	return slot, a.dropJournal(t)
}

func (a *admin) bind(ctx context.Context) (report, error) {
	pin, raw := a.opts.Args[1], a.opts.Args[2]
	cfg, err := clevis.ParseConfig(pin, []byte(raw))
	if err != nil {
		return nil, smapi.Wrap(smapi.KindInvalidConfiguration, fmt.Errorf("clevis %s configuration %s: %w", pin, raw, err))
	}
	t, unlock, st, err := a.keyVerb(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	existing, by, err := a.authorise(ctx, t)
	if err != nil {
		return nil, err
	}
	defer existing.Wipe()
	slot, err := a.sealNew(ctx, t, existing, cfg, "bind", nil)
	if err != nil {
		return nil, err
	}
	_, view, _ := policyOf(mustJWE(a, t, slot))
	return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "bind", Changed: true, NewKeyslot: intp(slot), Policy: &view, AuthorisedBy: by, Settled: st,
		Message: fmt.Sprintf("%s: keyslot %d added, sealed with %s, and proven to unlock.", t.describe(), slot, view)}, nil
}

// mustJWE re-reads the binding just written (for the report only).
func mustJWE(a *admin, t target, slot int) string {
	if err := a.refresh(&t); err == nil {
		if b, ok := bindingOf(t.Info, slot); ok {
			return b.JWE
		}
	}
	return ""
}

func (a *admin) rebind(ctx context.Context) (report, error) {
	t, unlock, st, err := a.keyVerb(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	n, convErr := strconv.Atoi(a.opts.Args[1])
	if convErr == nil && st != nil && st.finished && st.Op == "rebind" && len(st.Old) == 1 && st.Old[0] == n {
		// The crashed run had done the work; finishing it was the rebind.
		return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "rebind", Changed: true, NewKeyslot: intp(st.New), OldKeyslots: st.Old, Settled: st,
			Message: fmt.Sprintf("%s: keyslot %d was already re-sealed as keyslot %d; the old keyslot is now removed.", t.describe(), n, st.New)}, nil
	}
	slot, err := parseSlot(a.opts.Args[1], t.Info)
	if err != nil {
		return nil, err
	}
	b, bound := bindingOf(t.Info, slot)
	if !bound {
		return nil, usageErr("keyslot %d holds a passphrase, not a clevis binding; there is nothing to re-seal", slot)
	}
	cfg, view, err := policyOf(b.JWE)
	if err != nil {
		return nil, smapi.Wrap(smapi.KindInvalidConfiguration, fmt.Errorf("cannot read the policy of keyslot %d: %w", slot, err))
	}
	existing, by, err := a.authorise(ctx, t)
	if err != nil {
		return nil, err
	}
	defer existing.Wipe()
	newSlot, err := a.sealNew(ctx, t, existing, cfg, "rebind", []int{slot})
	if err != nil {
		return nil, err
	}
	if a.refresh(&t) == nil {
		a.recordAutoUnlock(ctx, a.statusOf(ctx, t)) // healthy again once every binding unseals
	}
	return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "rebind", Changed: true, NewKeyslot: intp(newSlot), OldKeyslots: []int{slot}, Policy: &view, AuthorisedBy: by, Settled: st,
		Message: fmt.Sprintf("%s: %s re-sealed to the current state as keyslot %d (proven to unlock); keyslot %d removed.", t.describe(), view, newSlot, slot)}, nil
}

func (a *admin) unbind(ctx context.Context) (report, error) {
	t, unlock, st, err := a.keyVerb(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	slot, err := parseSlot(a.opts.Args[1], t.Info)
	if err != nil {
		return nil, err
	}
	b, bound := bindingOf(t.Info, slot)
	if !bound {
		return nil, usageErr("keyslot %d holds a passphrase, not a clevis binding: use 'luksext recovery remove'", slot)
	}
	probes := a.probeBindings(ctx, t)
	left := working(probes, slot) + len(passphraseSlots(t.Info))
	if left == 0 && !a.opts.Force {
		return nil, refused("keyslot %d is the last way to unlock %s (no other binding unseals and there is no recovery passphrase); add one first (luksext bind / luksext recovery set), or use --force", slot, t.describe())
	}
	existing, by, err := a.authorise(ctx, t)
	if err != nil {
		return nil, err
	}
	existing.Wipe()
	if err := a.removeSlots(ctx, t, "unbind", []int{slot}); err != nil {
		return nil, err
	}
	_, view, _ := policyOf(b.JWE)
	return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "unbind", Changed: true, OldKeyslots: []int{slot}, Policy: &view, AuthorisedBy: by, Settled: st,
		Message: fmt.Sprintf("%s: keyslot %d (%s) and its binding removed.", t.describe(), slot, view)}, nil
}

func (a *admin) recoverySet(ctx context.Context) (report, error) {
	t, unlock, st, err := a.keyVerb(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if existing := passphraseSlots(t.Info); len(existing) > 0 {
		p, err := a.askNewPassphrase("recovery passphrase")
		if err != nil {
			return nil, err
		}
		defer p.Wipe()
		if slot, err := a.passphraseSlot(ctx, t, p, existing); err == nil {
			return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "recovery set", Changed: false, Settled: st,
				Message: fmt.Sprintf("%s: this recovery passphrase is already set (keyslot %d); nothing changed.", t.describe(), slot)}, nil
		}
		return nil, smapi.Errorf(smapi.KindAlreadyExists, "%s already has a recovery passphrase (keyslot %s); use 'luksext recovery rotate' to change it", t.describe(), joinInts(existing))
	}
	slot, by, err := a.newRecoveryPassphrase(ctx, t, "recovery set", nil)
	if err != nil {
		return nil, err
	}
	return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "recovery set", Changed: true, NewKeyslot: intp(slot), AuthorisedBy: by, Settled: st,
		Message: fmt.Sprintf("%s: recovery passphrase added in keyslot %d and proven to open it. Keep it offline.", t.describe(), slot)}, nil
}

// newRecoveryPassphrase authorises the change (a working binding, else the
// current recovery passphrase), asks for the new passphrase and adds it,
// removing the keyslots in replace once the new one is proven.
func (a *admin) newRecoveryPassphrase(ctx context.Context, t target, action string, replace []int) (slot int, by string, err error) {
	existing, by, err := a.authorise(ctx, t)
	if err != nil {
		return 0, "", err
	}
	defer existing.Wipe()
	p, err := a.askNewPassphrase("recovery passphrase")
	if err != nil {
		return 0, "", err
	}
	defer p.Wipe()
	slot, err = a.addPassphrase(ctx, t, existing, p, action, replace)
	return slot, by, err
}

func (a *admin) recoveryRotate(ctx context.Context) (report, error) {
	t, unlock, st, err := a.keyVerb(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	old := passphraseSlots(t.Info)
	if len(old) == 0 {
		return nil, smapi.Errorf(smapi.KindDeviceNotFound, "%s has no recovery passphrase to rotate; add one with 'luksext recovery set'", t.describe())
	}
	slot, by, err := a.newRecoveryPassphrase(ctx, t, "recovery rotate", old)
	if err != nil {
		return nil, err
	}
	return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "recovery rotate", Changed: true, NewKeyslot: intp(slot), OldKeyslots: old, AuthorisedBy: by, Settled: st,
		Message: fmt.Sprintf("%s: new recovery passphrase in keyslot %d, proven to open it; old passphrase keyslot(s) %s removed. Destroy header backups made before now.", t.describe(), slot, joinInts(old))}, nil
}

// undoAdd removes a keyslot that was added but not proven, then its
// journal. Neither failure hides cause: a slot that stays is named in the
// error, a journal that stays is logged, and the next run settles both.
func (a *admin) undoAdd(ctx context.Context, t target, slot int, cause error) error {
	ctx = context.WithoutCancel(ctx)
	if rerr := a.removeSlot(ctx, t.Dev, slot); rerr != nil {
		return fmt.Errorf("%w (and removing the unproven keyslot %d failed: %v; the next luksext run cleans it up)", cause, slot, rerr)
	}
	if derr := a.dropJournal(t); derr != nil {
		smapi.Logger(ctx).WithError(derr).WithField("dev", t.Dev).Warn("could not remove the key-change journal; the next luksext run settles it")
	}
	return cause
}

// addPassphrase adds a person's passphrase, proves it, then removes old.
func (a *admin) addPassphrase(ctx context.Context, t target, existing, p secret.Bytes, op string, old []int) (int, error) {
	slot, err := a.LUKS.FreeKeyslot(t.Dev)
	if err != nil {
		return 0, err
	}
	if err := a.writeJournal(t, keyJournal{Op: op, New: slot, Old: old, NewIsPassphrase: true}); err != nil {
		return 0, err
	}
	if _, err := a.LUKS.AddKeyslot(ctx, t.Dev, existing, p, slot, a.RecoveryKDF); err != nil {
		return 0, a.undoAdd(ctx, t, slot, err)
	}
	if err := a.LUKS.TestKeyslot(ctx, t.Dev, p, slot); err != nil {
		return 0, a.undoAdd(ctx, t, slot, fmt.Errorf("the new passphrase does not open keyslot %d: %w", slot, err))
	}
	for _, o := range old {
		if err := a.removeSlot(ctx, t.Dev, o); err != nil {
			return 0, fmt.Errorf("the new passphrase works, but removing keyslot %d failed (rerun to finish): %w", o, err)
		}
	}
	return slot, a.dropJournal(t)
}

func (a *admin) recoveryRemove(ctx context.Context) (report, error) {
	t, unlock, st, err := a.keyVerb(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	old := passphraseSlots(t.Info)
	if len(old) == 0 {
		return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "recovery remove", Changed: false, Settled: st,
			Message: fmt.Sprintf("%s has no recovery passphrase; nothing changed.", t.describe())}, nil
	}
	if n := working(a.probeBindings(ctx, t), -1); n < 2 && !a.opts.Force {
		return nil, refused("removing the recovery passphrase of %s would leave %d binding(s) that unseal now as the only way in; a firmware update or a failed TPM would then lock the data away. Add another binding first (e.g. luksext bind SR tang ...), or use --force", t.describe(), n)
	}
	existing, by, err := a.authorise(ctx, t)
	if err != nil {
		return nil, err
	}
	existing.Wipe()
	if err := a.removeSlots(ctx, t, "recovery remove", old); err != nil {
		return nil, err
	}
	return keyChange{SR: t.SRUUID, Device: t.Dev, Action: "recovery remove", Changed: true, OldKeyslots: old, AuthorisedBy: by, Settled: st,
		Message: fmt.Sprintf("%s: recovery passphrase keyslot(s) %s removed.", t.describe(), joinInts(old))}, nil
}

// removeSlots removes keyslots (and their bindings) under the key-change
// journal, so that a run killed half-way is finished by the next one
// (settle).
func (a *admin) removeSlots(ctx context.Context, t target, op string, slots []int) error {
	if err := a.writeJournal(t, keyJournal{Op: op, New: -1, Old: slots}); err != nil {
		return err
	}
	for _, o := range slots {
		if err := a.removeSlot(ctx, t.Dev, o); err != nil {
			return err
		}
	}
	return a.dropJournal(t)
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// context is the invocation's context (Background when none was set).
func (a *admin) context() context.Context {
	if a.ctx == nil {
		return context.Background()
	}
	return a.ctx
}

package luksext

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// unlockDevice maps dev as /dev/mapper/<name> with no person present: it
// tries every clevis binding in keyslot order (TPM, Tang, sss), then the
// recovery passphrase when the administrator opted in to the fallback. An
// existing mapping is success (an operator may have unlocked it by hand).
// When nothing works, the error lists why per method and how to recover.
func (s *srService) unlockDevice(ctx context.Context, dev, name string, fallback *recoverySource) error {
	_, err := s.unlockDeviceVia(ctx, dev, name, fallback)
	return err
}

// unlockDeviceVia is unlockDevice that also says, when it had to use the
// recovery passphrase, why every binding failed (empty otherwise).
func (s *srService) unlockDeviceVia(ctx context.Context, dev, name string, fallback *recoverySource) (viaRecovery string, err error) {
	log := smapi.Logger(ctx).WithFields(map[string]any{"dev": dev, "dm_name": name})
	if s.LUKS.IsOpen(name) {
		log.Info("device already unlocked")
		return "", nil
	}
	bindings, err := s.LUKS.Bindings(dev)
	if err != nil {
		return "", fmt.Errorf("reading the key bindings of %s: %w", dev, err)
	}
	var failures []string
	for _, b := range bindings {
		what := describeBinding(b)
		t0 := time.Now()
		pass, err := s.Keys.Decrypt(ctx, b.JWE)
		attachStepsOf(ctx).since("unseal", t0)
		if err != nil {
			log.WithField("keyslot", b.Keyslot).WithError(err).Warn("automatic unlock method failed")
			failures = append(failures, fmt.Sprintf("%s: %v", what, err))
			continue
		}
		t0 = time.Now()
		err = s.LUKS.Open(ctx, dev, name, pass, b.Keyslot)
		attachStepsOf(ctx).since("open", t0)
		pass.Wipe()
		if err != nil {
			failures = append(failures, fmt.Sprintf("%s: %v", what, err))
			continue
		}
		log.WithField("keyslot", b.Keyslot).Info("unlocked with " + what)
		return "", nil
	}
	if len(bindings) == 0 {
		failures = append(failures, errNoBinding.Error())
	}
	if fallback != nil && fallback.present() {
		pass, err := s.recoveryPassphrase(ctx, *fallback)
		if err == nil {
			err = s.LUKS.Open(ctx, dev, name, pass, -1)
			pass.Wipe()
		}
		if err == nil {
			log.Warn("automatic unlock failed (" + strings.Join(failures, "; ") + "); unlocked with the recovery passphrase kept in xapi. Run 'luksext rebind' to make the TPM binding work again")
			return strings.Join(failures, "; "), nil
		}
		failures = append(failures, fmt.Sprintf("recovery passphrase: %v", err))
	}
	return "", smapi.Errorf(smapi.KindKeyUnavailable,
		"could not unlock %s automatically (%s). To recover: run 'luksext unlock %s' on this host and type the recovery passphrase, then plug the SR again (xe pbd-plug); after an intended change (firmware or Secure Boot update, new board) run 'luksext rebind' to seal the key to the TPM's current state",
		dev, strings.Join(failures, "; "), strings.TrimPrefix(name, luks.NamePrefix))
}

// describeBinding names a binding for messages: "keyslot 0 (tpm2)".
func describeBinding(b luks.Binding) string {
	pin, err := clevis.PinName(b.JWE)
	if err != nil {
		pin = "unreadable binding"
	}
	return fmt.Sprintf("keyslot %d (%s)", b.Keyslot, pin)
}

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

func validUUID(s string) bool { return uuidRE.MatchString(s) }

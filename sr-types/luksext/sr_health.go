package luksext

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/luksext/luksext/plugins/durable"
	"os"
	"path/filepath"
	"time"

	"github.com/luksext/luksext/plugins/smapi"
)

// Automatic unlock can break while the SR keeps working: SR.attach fell
// back to the recovery passphrase kept in xapi, or `luksext status` found a
// binding that no longer unseals. Nobody is at the console when that
// happens, so the SR says it two ways: SR.stat's health, and a XAPI message
// on the SR, which Xen Orchestra lists in the SR's Logs tab.

// Names of the XAPI messages. Priorities are xapi's scale
// (xen-api ocaml/xapi-consts/api_messages.ml): 3 "Warning: take action now
// or some service may suffer", 4 "Minor: something just improved".
const (
	MsgAutoUnlockBroken   = "LUKSEXT_AUTO_UNLOCK_BROKEN"
	MsgAutoUnlockRepaired = "LUKSEXT_AUTO_UNLOCK_REPAIRED"
	msgPriorityWarning    = 3
	msgPriorityMinor      = 4
)

// Notifier posts a XAPI message about an object (plugins/xapi: message.create).
type Notifier interface {
	PostMessage(ctx context.Context, name string, priority int, class, objUUID, body string) error
}

// autoUnlockState is what SR.stat reads: present means automatic unlock
// is broken. It lives under StateDir (tmpfs): a reboot clears it and the
// next SR.attach decides again.
type autoUnlockState struct {
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
}

func (s *srService) healthPath(srUUID string) string {
	return filepath.Join(s.StateDir, "health", srUUID+".json")
}

// readAutoUnlock returns the recorded breakage, if any. A file that cannot
// be read counts as none: health is advice, it must not fail SR.stat.
func (s *srService) readAutoUnlock(srUUID string) (autoUnlockState, bool) {
	b, err := os.ReadFile(s.healthPath(srUUID))
	if err != nil {
		return autoUnlockState{}, false
	}
	var st autoUnlockState
	if json.Unmarshal(b, &st) != nil || st.Reason == "" {
		return autoUnlockState{}, false
	}
	return st, true
}

// health is SR.stat's health for the SR. SMAPIv3 has no "Degraded"
// (xen-api ocaml/xapi-storage/generator/lib/control.ml: Healthy,
// Recovering, Unreachable, Unavailable; xapi-storage-script cannot parse
// any other name, and SR.stat failing would fail the plug). Anything but
// Healthy makes xapi-storage-script refuse SR.scan2 (main.ml
// sr_scan2_impl: SR_UNHEALTHY), which would break rescans and storage
// migration into an SR that works perfectly: a broken automatic unlock is
// a risk for the next boot, not a fault now. So the state stays Healthy
// and the reason says "Degraded: ..." in words; the XAPI message
// LUKSEXT_AUTO_UNLOCK_BROKEN is what Xen Orchestra shows.
func (s *srService) health(srUUID string) smapi.Health {
	if st, ok := s.readAutoUnlock(srUUID); ok {
		return smapi.Health{State: "Healthy", Reason: "Degraded: " + st.Reason}
	}
	return smapi.Healthy()
}

// markAutoUnlockBroken records the breakage (the latest reason) and, when
// it was not recorded yet, posts LUKSEXT_AUTO_UNLOCK_BROKEN on the SR. Neither
// step may fail the caller: the SR works; a failure is logged.
func (s *srService) markAutoUnlockBroken(ctx context.Context, srUUID, reason string) {
	log := smapi.Logger(ctx).WithField("sr_uuid", srUUID)
	old, had := s.readAutoUnlock(srUUID)
	st := autoUnlockState{Reason: reason, Since: time.Now().UTC()}
	if had {
		st.Since = old.Since
	}
	b, _ := json.Marshal(st)
	if err := os.MkdirAll(filepath.Dir(s.healthPath(srUUID)), 0o700); err != nil {
		log.WithError(err).Warn("could not record that automatic unlock is broken")
	} else if err := durable.WriteFile(s.healthPath(srUUID), b, 0o600); err != nil {
		log.WithError(err).Warn("could not record that automatic unlock is broken")
	}
	log.WithField("reason", reason).Warn("automatic unlock is broken; SR health is degraded until 'luksext rebind'")
	if had {
		return // one message per breakage, not one per check
	}
	s.notify(ctx, srUUID, MsgAutoUnlockBroken, msgPriorityWarning,
		fmt.Sprintf("SR %s %s. Automatic unlock at the next boot is not assured: on this host run 'luksext status %s', then 'luksext rebind %s SLOT' for each binding that does not unseal.", srUUID, reason, srUUID, srUUID))
}

// markAutoUnlockWorking clears the record; when there was one, it posts
// LUKSEXT_AUTO_UNLOCK_REPAIRED.
func (s *srService) markAutoUnlockWorking(ctx context.Context, srUUID string) {
	if _, had := s.readAutoUnlock(srUUID); !had {
		return
	}
	if err := os.Remove(s.healthPath(srUUID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		smapi.Logger(ctx).WithError(err).Warn("could not clear the degraded-health record")
		return
	}
	smapi.Logger(ctx).WithField("sr_uuid", srUUID).Info("automatic unlock works again; SR health is Healthy")
	s.notify(ctx, srUUID, MsgAutoUnlockRepaired, msgPriorityMinor,
		fmt.Sprintf("SR %s: every key binding unseals again; automatic unlock works.", srUUID))
}

func (s *srService) notify(ctx context.Context, srUUID, name string, priority int, body string) {
	if s.Notify == nil {
		return
	}
	if err := s.Notify.PostMessage(ctx, name, priority, "SR", srUUID, body); err != nil {
		smapi.Logger(ctx).WithError(err).WithField("message", name).Warn("could not post the XAPI message on the SR")
	}
}

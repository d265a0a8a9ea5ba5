package operator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

// headerReport is the answer of header-backup and header-restore.
type headerReport struct {
	SR      string `json:"sr_uuid,omitempty"`
	Device  string `json:"device"`
	File    string `json:"file"`
	Action  string `json:"action"`
	Warning string `json:"warning"`
	Message string `json:"message"`
}

func (h headerReport) Text() string { return h.Message + "\n" }

const backupWarning = "WARNING: this header backup opens the disk with every passphrase and binding valid now, even after they are removed or changed on the disk. Keep it offline, as safe as the recovery passphrase, and destroy it after a passphrase change."

const restoreWarning = "WARNING: restoring a header overwrites EVERY keyslot and binding of the disk: keys added since the backup (e.g. by rebind) stop working, and passphrases removed since work again."

func (a *admin) headerBackup(ctx context.Context) (report, error) {
	file := a.opts.Args[1]
	if _, err := os.Lstat(file); err == nil {
		return nil, smapi.Errorf(smapi.KindAlreadyExists, "%s already exists; choose a new file name (a backup is never overwritten)", file)
	}
	t, err := a.resolve(a.opts.Args[0])
	if err != nil {
		return nil, err
	}
	// Under the lock: never copy a header halfway through a key change.
	release, err := a.lock(ctx, t)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := a.LUKS.BackupHeader(ctx, t.Dev, file); err != nil {
		return nil, err
	}
	if err := os.Chmod(file, 0o400); err != nil {
		return nil, fmt.Errorf("restricting %s to root: %w", file, err)
	}
	fmt.Fprintln(a.inv.Stderr, backupWarning)
	return headerReport{SR: t.SRUUID, Device: t.Dev, File: file, Action: "header-backup", Warning: backupWarning,
		Message: fmt.Sprintf("LUKS header of %s saved to %s (readable by root only).", t.describe(), file)}, nil
}

func (a *admin) headerRestore(ctx context.Context) (report, error) {
	arg, file := a.opts.Args[0], a.opts.Args[1]
	backup, err := a.LUKS.Inspect(file)
	if err != nil {
		return nil, smapi.Errorf(smapi.KindInvalidParameters, "%s is not a LUKS header backup (%v)", file, err)
	}
	t, err := a.resolve(arg)
	switch {
	case err == nil:
		if !strings.EqualFold(t.Info.UUID, backup.UUID) && !a.opts.Force {
			return nil, refused("%s is the header of another disk (LUKS uuid %s, this disk has %s); use --force if you really mean it", file, backup.UUID, t.Info.UUID)
		}
	case strings.HasPrefix(arg, "/") && isNotLUKS(err):
		// The header is gone (wiped, overwritten): the backup says whose
		// disk this is.
		t = newTarget(arg, arg, backup)
	default:
		return nil, err
	}
	release, err := a.lock(ctx, t)
	if err != nil {
		return nil, err
	}
	defer release()
	if a.LUKS.IsOpen(t.Name) || (t.SRUUID != "" && a.LUKS.IsOpen(luks.SRName(t.SRUUID))) {
		return nil, smapi.Errorf(smapi.KindInUse, "%s is unlocked (/dev/mapper/%s); detach the SR first (xe pbd-unplug)", t.describe(), t.Name)
	}
	fmt.Fprintln(a.inv.Stderr, restoreWarning)
	if !a.opts.Yes {
		if a.Terminal == nil {
			return nil, refused("not confirmed: use --yes")
		}
		answer, err := a.Terminal.ReadLine(fmt.Sprintf("Overwrite every keyslot of %s with %s? Type YES: ", t.Dev, file))
		if err != nil {
			if errors.Is(err, ErrNoTerminal) {
				return nil, refused("not confirmed (no terminal): use --yes")
			}
			return nil, err
		}
		if strings.TrimSpace(answer) != "YES" {
			return nil, refused("not confirmed; nothing changed")
		}
	}
	if err := a.LUKS.RestoreHeader(ctx, t.Dev, file); err != nil {
		return nil, err
	}
	// A journal describes keyslots of the header just replaced; settling
	// it against the restored one could remove a keyslot that works.
	if err := a.dropJournal(t); err != nil {
		return nil, err
	}
	smapi.Logger(ctx).WithFields(map[string]any{"dev": t.Dev, "file": file}).Warn("LUKS header restored from a backup")
	return headerReport{SR: t.SRUUID, Device: t.Dev, File: file, Action: "header-restore", Warning: restoreWarning,
		Message: fmt.Sprintf("LUKS header of %s restored from %s. Check it with 'luksext status %s'.", t.describe(), file, arg)}, nil
}

func isNotLUKS(err error) bool {
	var se *smapi.Error
	return errors.As(err, &se) && se.Kind == smapi.KindDeviceNotFound
}

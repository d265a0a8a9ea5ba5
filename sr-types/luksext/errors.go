package luksext

import (
	"errors"
	"syscall"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
	"github.com/luksext/luksext/plugins/xapi"
)

type classification struct {
	kind  smapi.Kind
	match func(error) bool
}

func is(target error) func(error) bool { return func(err error) bool { return errors.Is(err, target) } }

// classifications maps domain sentinels to kinds, most specific first. An
// error that is already an *smapi.Error keeps its own kind; everything
// else not matched here becomes Internal_error.
var classifications = []classification{
	{smapi.KindToolMissing, is(run.ErrToolMissing)},
	{smapi.KindNoSpace, is(syscall.ENOSPC)},
	{smapi.KindDeviceNotBlank, is(blockdev.ErrSignaturePresent)},
	{smapi.KindDeviceNotFound, is(luks.ErrDeviceNotFound)},
	{smapi.KindDeviceNotFound, is(blockdev.ErrDeviceNotFound)},
	{smapi.KindWrongPassphrase, is(luks.ErrWrongPassphrase)},
	{smapi.KindInUse, is(luks.ErrBusy)},
	{smapi.KindInUse, is(fs.ErrBusy)},
	{smapi.KindNeedsAttention, is(fs.ErrCorrupt)},
	{smapi.KindNoSpace, is(luks.ErrNoSpace)},
	{smapi.KindTPMUnavailable, is(clevis.ErrTPMAbsent)},
	{smapi.KindTPMUnavailable, is(clevis.ErrTPMLockout)},
	{smapi.KindTPMUnavailable, is(clevis.ErrTPMOwnerAuth)},
	{smapi.KindTPMUnavailable, is(clevis.ErrTPMBusy)},
	{smapi.KindKeyUnavailable, is(clevis.ErrPCRMismatch)},
	{smapi.KindKeyUnavailable, is(clevis.ErrWrongTPM)},
	{smapi.KindKeyUnavailable, is(clevis.ErrTangUnreachable)},
	{smapi.KindKeyUnavailable, is(clevis.ErrTangKeyUnknown)},
	{smapi.KindKeyUnavailable, is(clevis.ErrThresholdNotMet)},
	{smapi.KindInvalidConfiguration, is(clevis.ErrThumbprintMismatch)},
	{smapi.KindInvalidConfiguration, is(clevis.ErrInvalidConfig)},
	{smapi.KindInvalidConfiguration, is(xapi.ErrSecretNotFound)},
	{smapi.KindInternal, is(xapi.ErrUnreachable)},
	{smapi.KindInvalidParameters, is(ErrBadURI)},
	{smapi.KindInvalidParameters, is(attachment.ErrNotAttached)},
	{smapi.KindInUse, is(attachment.ErrInUse)},
	{smapi.KindNeedsAttention, is(attachment.ErrDamagedRecord)},
	// a VM's tapdisk that does not pause: nothing was changed, retry later
	{smapi.KindInUse, is(attachment.ErrPauseFailed)},
	{smapi.KindInUse, is(attachment.ErrStalePause)},
	// volumes
	{smapi.KindVolumeDoesNotExist, is(store.ErrNotFound)},
	{smapi.KindNeedsAttention, is(store.ErrCorrupt)},
	{smapi.KindSRNotAttached, is(store.ErrUnreadable)},
	{smapi.KindInvalidParameters, is(image.ErrShrink)},
	{smapi.KindInvalidParameters, is(image.ErrTooLarge)},
	{smapi.KindInvalidParameters, is(image.ErrInvalidSize)},
	{smapi.KindInUse, is(ErrChainTooDeep)},
	{smapi.KindInUse, is(lock.ErrTimeout)},
}

package luksext

import (
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
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/plugins/xapi"
)

// classification gives errors that wrap target (errors.Is) a kind.
type classification struct {
	kind   smapi.Kind
	target error
}

// classifications maps domain sentinels to kinds, most specific first. An
// error that is already an *smapi.Error keeps its own kind; everything
// else not matched here becomes Internal_error (smapi.KindOf).
var classifications = []classification{
	{smapi.KindToolMissing, run.ErrToolMissing},
	{smapi.KindNoSpace, syscall.ENOSPC},
	{smapi.KindDeviceNotBlank, blockdev.ErrSignaturePresent},
	{smapi.KindDeviceNotFound, luks.ErrDeviceNotFound},
	{smapi.KindDeviceNotFound, blockdev.ErrDeviceNotFound},
	{smapi.KindWrongPassphrase, luks.ErrWrongPassphrase},
	{smapi.KindInUse, luks.ErrBusy},
	{smapi.KindInUse, fs.ErrBusy},
	{smapi.KindNeedsAttention, fs.ErrCorrupt},
	{smapi.KindNoSpace, luks.ErrNoSpace},
	{smapi.KindTPMUnavailable, clevis.ErrTPMAbsent},
	{smapi.KindTPMUnavailable, clevis.ErrTPMLockout},
	{smapi.KindTPMUnavailable, clevis.ErrTPMOwnerAuth},
	{smapi.KindTPMUnavailable, clevis.ErrTPMBusy},
	{smapi.KindKeyUnavailable, clevis.ErrPCRMismatch},
	{smapi.KindKeyUnavailable, clevis.ErrWrongTPM},
	{smapi.KindKeyUnavailable, clevis.ErrTangUnreachable},
	{smapi.KindKeyUnavailable, clevis.ErrTangKeyUnknown},
	{smapi.KindKeyUnavailable, clevis.ErrThresholdNotMet},
	{smapi.KindInvalidConfiguration, clevis.ErrThumbprintMismatch},
	{smapi.KindInvalidConfiguration, clevis.ErrInvalidConfig},
	{smapi.KindInvalidConfiguration, xapi.ErrSecretNotFound},
	{smapi.KindInternal, xapi.ErrUnreachable},
	{smapi.KindInvalidParameters, ErrBadURI},
	{smapi.KindInvalidParameters, attachment.ErrNotAttached},
	{smapi.KindInUse, attachment.ErrInUse},
	{smapi.KindNeedsAttention, attachment.ErrDamagedRecord},
	// a VM's tapdisk that does not pause: nothing was changed, retry later
	{smapi.KindInUse, attachment.ErrPauseFailed},
	{smapi.KindInUse, attachment.ErrStalePause},
	{smapi.KindInUse, blockdev.ErrInUse},
	// volumes
	{smapi.KindVolumeDoesNotExist, store.ErrNotFound},
	{smapi.KindNeedsAttention, store.ErrCorrupt},
	{smapi.KindNeedsAttention, vhd.ErrNotVHD},
	{smapi.KindSRNotAttached, store.ErrUnreadable},
	{smapi.KindInvalidParameters, image.ErrShrink},
	{smapi.KindInvalidParameters, image.ErrTooLarge},
	{smapi.KindInvalidParameters, image.ErrInvalidSize},
	{smapi.KindInUse, ErrChainTooDeep},
	{smapi.KindInUse, lock.ErrTimeout},
}

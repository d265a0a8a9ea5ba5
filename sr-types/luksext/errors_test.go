package luksext

import (
	"fmt"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
	"github.com/luksext/luksext/plugins/xapi"
)

// Each domain sentinel, wrapped as callers wrap it, reaches xe under the
// intended name.
func TestClassify(t *testing.T) {
	cases := map[error]string{
		run.ErrToolMissing:                  "Tool_missing",
		syscall.ENOSPC:                      "No_space_left",
		blockdev.ErrSignaturePresent:        "Device_not_blank",
		luks.ErrDeviceNotFound:              "Device_not_found",
		luks.ErrWrongPassphrase:             "Wrong_passphrase",
		luks.ErrBusy:                        "In_use",
		clevis.ErrTPMAbsent:                 "TPM_unavailable",
		clevis.ErrTPMLockout:                "TPM_unavailable",
		clevis.ErrPCRMismatch:               "Key_unavailable",
		clevis.ErrTangUnreachable:           "Key_unavailable",
		clevis.ErrThumbprintMismatch:        "Invalid_configuration",
		xapi.ErrSecretNotFound:              "Invalid_configuration",
		attachment.ErrPauseFailed:           "In_use",
		attachment.ErrStalePause:            "In_use",
		fmt.Errorf("plain programming bug"): "Internal_error",
	}
	for sentinel, want := range cases {
		rec := smapi.ToRecord(fmt.Errorf("step: %w", sentinel), Classify)
		assert.Equal(t, smapi.BackendFailure, rec.Code)
		assert.Equal(t, want, rec.Params[0], "for %v", sentinel)
	}
	// An explicit kind set by a handler wins over the table.
	rec := smapi.ToRecord(smapi.Wrap(smapi.KindKeyUnavailable, fmt.Errorf("x: %w", luks.ErrWrongPassphrase)), Classify)
	assert.Equal(t, "Key_unavailable", rec.Params[0])
}

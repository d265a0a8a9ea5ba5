package luksext

import (
	"context"
	"fmt"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
)

// Each domain sentinel, wrapped as callers wrap it, reaches xe under the
// intended name.
func TestClassify(t *testing.T) {
	// Every row of the table: its sentinel, wrapped as handlers wrap, gets
	// the row's kind. A row shadowed by an earlier row of another kind (a
	// sentinel that wraps another one listed first) fails here.
	for _, c := range classifications {
		rec := smapi.ToRecord(fmt.Errorf("step: %w", c.target), Classify)
		assert.Equal(t, c.kind.Code, rec.Code, "for %v", c.target)
		assert.Equal(t, c.kind.Name, rec.Params[0], "for %v", c.target)
	}
	// Not in the table: a programming bug is Internal_error, a cancelled
	// call is Cancelled.
	assert.Equal(t, "Internal_error", smapi.ToRecord(fmt.Errorf("plain programming bug"), Classify).Params[0])
	assert.Equal(t, smapi.KindCancelled.Name, smapi.ToRecord(fmt.Errorf("x: %w", context.Canceled), Classify).Params[0])
	// An explicit kind set by a handler wins over the table.
	rec := smapi.ToRecord(smapi.Wrap(smapi.KindKeyUnavailable, fmt.Errorf("x: %w", luks.ErrWrongPassphrase)), Classify)
	assert.Equal(t, "Key_unavailable", rec.Params[0])
	// The user-facing names of a few rows, spelled out: renaming a kind is
	// a change xe users see.
	for sentinel, want := range map[error]string{
		run.ErrToolMissing: "Tool_missing", syscall.ENOSPC: "No_space_left", blockdev.ErrSignaturePresent: "Device_not_blank",
		luks.ErrWrongPassphrase: "Wrong_passphrase", clevis.ErrPCRMismatch: "Key_unavailable", clevis.ErrTPMLockout: "TPM_unavailable",
	} {
		assert.Equal(t, want, smapi.ToRecord(fmt.Errorf("step: %w", sentinel), Classify).Params[0], "for %v", sentinel)
	}
}

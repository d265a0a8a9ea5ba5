package tpm_test

import (
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"

	"github.com/luksext/luksext/plugins/tpm"
	"github.com/luksext/luksext/plugins/tpm/tpmtest"
)

// A real TPM's lockout answer (with the bits a real TPM sets) must be
// classified as lockout, and the owner hierarchy clevis seals under must
// stay usable: its empty password is not subject to dictionary-attack
// protection.
func TestClassifyRealLockout(t *testing.T) {
	sw := tpmtest.Start(t)
	err := tpm.Classify(sw.LockOut(t))
	assert.ErrorIs(t, err, tpm.ErrLockout)
	assert.ErrorIs(t, err, tpm2.TPMRCLockout)

	tp := sw.Open(t)
	_, err = tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tp)
	assert.NoError(t, err, "owner hierarchy in lockout")
}

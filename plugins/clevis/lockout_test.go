package clevis_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
)

// Wrong passwords for any DA-protected TPM key put the whole TPM into
// dictionary-attack lockout. clevis' sealed objects carry noDA, but their
// parent, the primary made from tpm2-tools' default template, does not
// (and cannot gain it without changing the key: the template's attributes
// are part of the key's name, tpm2-tools lib/tpm2_alg_util.c), so Load
// is refused: unlocks fail in lockout, for clevis as for us. They must
// fail with the lockout kind and a message that says what to do, never
// as a policy or wrong-TPM error, and work again once it is cleared.
func TestTPM2LockoutIsReportedAndRecoverable(t *testing.T) {
	f := newFixture(t, false)
	pt := newPlaintext(t)
	var jwes []string
	for _, cfg := range []string{`{}`, `{"pcr_bank":"sha256","pcr_ids":"7"}`} {
		ours, err := f.c.Encrypt(f.ctx(), f.config("tpm2", cfg), pt)
		require.NoError(t, err)
		jwes = append(jwes, ours, f.clevisEncrypt("tpm2", cfg, pt.Expose()))
	}
	require.Error(t, f.sw.LockOut(t))

	for i, jwe := range jwes {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.Error(t, err, "JWE %d in lockout", i)
		assert.True(t, got.IsEmpty())
		assert.ErrorIs(t, err, clevis.ErrTPMLockout, "JWE %d", i)
		assert.NotErrorIs(t, err, clevis.ErrPCRMismatch)
		assert.NotErrorIs(t, err, clevis.ErrWrongTPM)
		assert.Contains(t, err.Error(), "dictionary-attack lockout")
	}
	_, err := f.clevisDecrypt(jwes[1])
	assert.Error(t, err, "clevis cannot unlock in lockout either")
	_, err = f.c.Encrypt(f.ctx(), f.config("tpm2", `{}`), pt)
	assert.ErrorIs(t, err, clevis.ErrTPMLockout, "binding in lockout")

	f.sw.ClearLockout(t)
	for i, jwe := range jwes {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.NoError(t, err, "JWE %d after the lockout was cleared", i)
		assert.True(t, pt.Equal(got))
		got.Wipe()
	}
}

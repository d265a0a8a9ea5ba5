package clevis_test

import (
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/tpm"
)

// Some sites set an owner-hierarchy password. clevis cannot supply one
// (clevis issue #198), and neither can the clevis format: unlock and
// binding must then fail saying so, not as a wrong TPM or a PCR change,
// and work again once the password is removed.
func TestTPM2OwnerPasswordIsReported(t *testing.T) {
	f := newFixture(t, false)
	changeauth := testenv.Tools(t, "tpm2_changeauth")["tpm2_changeauth"]
	run := func(args ...string) {
		cmd := exec.Command(changeauth, args...)
		cmd.Env = append(os.Environ(), f.sw.Env()...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	pt := newPlaintext(t)
	jwe, err := f.c.Encrypt(f.ctx(), f.config("tpm2", `{"pcr_bank":"sha256","pcr_ids":"7"}`), pt)
	require.NoError(t, err)

	run("-c", "owner", "owner-secret")
	_, err = f.c.Decrypt(f.ctx(), jwe)
	require.Error(t, err)
	assert.ErrorIs(t, err, clevis.ErrTPMOwnerAuth)
	assert.NotErrorIs(t, err, tpm.ErrWrongTPM)
	assert.NotErrorIs(t, err, tpm.ErrPolicyMismatch)
	assert.Contains(t, err.Error(), "owner hierarchy")
	_, err = f.c.Encrypt(f.ctx(), f.config("tpm2", `{}`), pt)
	assert.ErrorIs(t, err, clevis.ErrTPMOwnerAuth)

	run("-c", "owner", "-p", "owner-secret")
	got, err := f.c.Decrypt(f.ctx(), jwe)
	require.NoError(t, err)
	assert.True(t, pt.Equal(got))
}

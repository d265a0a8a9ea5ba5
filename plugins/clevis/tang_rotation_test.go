package clevis_test

import (
	"fmt"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/testenv"
)

// Tang administrators rotate keys routinely (tangd-rotate-keys): the old
// keys are hidden from the advertisement but kept for recovery. Data bound
// before the rotation must still unlock, through us and through clevis,
// whichever side bound it. Binding anew with the old signing key's
// thumbprint must be refused, as clevis refuses it: that key no longer
// signs what the server advertises.
func TestTangRotatedKeysStillRecover(t *testing.T) {
	f := newFixture(t, true)
	rotate := testenv.Tools(t, "tangd-rotate-keys")["tangd-rotate-keys"]
	pt := newPlaintext(t)
	cfg := fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp)
	ours, err := f.c.Encrypt(f.ctx(), f.config("tang", cfg), pt)
	require.NoError(t, err)
	theirs := f.clevisEncrypt("tang", cfg, pt.Expose())

	out, err := exec.Command(rotate, "-d", f.tang.KeyDir).CombinedOutput()
	require.NoError(t, err, "%s", out)
	newThp := f.tang.SigningThumbprint(t)
	require.NotEqual(t, f.tang.Thp, newThp, "rotation must change the advertised signing key")

	for name, jwe := range map[string]string{"ours": ours, "clevis'": theirs} {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.NoError(t, err, name)
		assert.True(t, pt.Equal(got), name)
		got.Wipe()
		plain, err := f.clevisDecrypt(jwe)
		require.NoError(t, err, "clevis decrypt of %s JWE after rotation", name)
		assert.Equal(t, string(pt.Expose()), string(plain), name)
	}

	stale := fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp)
	_, err = f.c.Encrypt(f.ctx(), f.config("tang", stale), pt)
	assert.ErrorIs(t, err, clevis.ErrThumbprintMismatch)
	_, err = f.clevis(pt.Expose(), "encrypt", "tang", stale)
	assert.Error(t, err, "clevis refuses the rotated thumbprint too")

	fresh := fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, newThp)
	jwe, err := f.c.Encrypt(f.ctx(), f.config("tang", fresh), pt)
	require.NoError(t, err)
	plain, err := f.clevisDecrypt(jwe)
	require.NoError(t, err)
	assert.Equal(t, string(pt.Expose()), string(plain))
}

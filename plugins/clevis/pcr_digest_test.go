package clevis_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/testenv"
)

// Before a firmware or boot loader update an administrator re-binds to
// the PCR values the update will produce (pcr_digest). Such a binding
// must refuse to unlock now and unlock after the update, whether we or
// clevis made it, and for both of us.
func TestTPM2PredictedPCRDigest(t *testing.T) {
	f := newFixture(t, false)
	pcrread := testenv.Tools(t, "tpm2_pcrread")["tpm2_pcrread"]
	out := filepath.Join(t.TempDir(), "pcr7")
	cmd := exec.Command(pcrread, "-Q", "sha256:7", "-o", out)
	cmd.Env = append(os.Environ(), f.sw.Env()...)
	msg, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", msg)
	now, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Len(t, now, sha256.Size)

	// f.extendPCR(7) extends with 32 bytes of 0xab: PCR' = H(PCR ‖ digest).
	next := sha256.Sum256(append(append([]byte{}, now...), bytes.Repeat([]byte{0xab}, 32)...))
	cfg := fmt.Sprintf(`{"pcr_bank":"sha256","pcr_ids":"7","pcr_digest":%q}`, base64.RawURLEncoding.EncodeToString(next[:]))
	pt := newPlaintext(t)
	ours, theirs := f.encryptBoth(t, cfg, pt)

	for _, jwe := range []string{ours, theirs} {
		_, err := f.c.Decrypt(f.ctx(), jwe)
		assert.ErrorIs(t, err, clevis.ErrPCRMismatch, "before the predicted change")
	}
	f.extendPCR(7)
	for _, jwe := range []string{ours, theirs} {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.NoError(t, err, "after the predicted change")
		assert.True(t, pt.Equal(got))
		plain, err := f.clevisDecrypt(jwe)
		require.NoError(t, err)
		assert.Equal(t, string(pt.Expose()), string(plain))
	}
}

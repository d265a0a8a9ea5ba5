package clevis_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/secret"
)

// An sss JWE whose shares do decrypt (here: tpm2 shares sealed to this
// very TPM, as someone able to write a LUKS token could make) but whose
// prime is not a prime must be refused as malformed, not crash the plugin
// with a division by zero or yield a key from a degenerate field.
func TestSSSHostilePrime(t *testing.T) {
	f := newFixture(t, false)
	for name, p := range map[string][]byte{"zero": {0}, "one": {1}, "composite": {0x01, 0x00}} {
		t.Run(name, func(t *testing.T) {
			share, err := f.c.Encrypt(f.ctx(), f.config("tpm2", `{}`), secret.New(make([]byte, 2*len(p))))
			require.NoError(t, err)
			hdr, err := json.Marshal(map[string]any{
				"alg": "dir", "enc": "A256GCM",
				"clevis": map[string]any{"pin": "sss", "sss": map[string]any{
					"t": 1, "p": base64.RawURLEncoding.EncodeToString(p), "jwe": []string{share},
				}},
			})
			require.NoError(t, err)
			jwe := fmt.Sprintf("%s..%s.%s.%s", base64.RawURLEncoding.EncodeToString(hdr),
				"AAAAAAAAAAAAAAAA", "AAAA", "AAAAAAAAAAAAAAAAAAAAAA")
			var got secret.Bytes
			require.NotPanics(t, func() { got, err = f.c.Decrypt(f.ctx(), jwe) })
			require.Error(t, err)
			assert.True(t, got.IsEmpty())
			assert.ErrorIs(t, err, clevis.ErrMalformed)
		})
	}
}

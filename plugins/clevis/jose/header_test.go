package jose_test

import (
	"encoding/base64"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis/jose"
)

// Header members that change how the payload must be read are refused
// rather than ignored: a "zip" JWE would otherwise decrypt to compressed
// bytes that a caller would take for the key.
func TestParseRefusesZipAndCrit(t *testing.T) {
	tail := "..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA"
	enc := base64.RawURLEncoding.EncodeToString
	for _, hdr := range []string{
		`{"alg":"dir","enc":"A256GCM","zip":"DEF","clevis":{"pin":"tpm2"}}`,
		`{"alg":"dir","enc":"A256GCM","crit":["exp"],"exp":1,"clevis":{"pin":"tpm2"}}`,
	} {
		_, err := jose.Parse(enc([]byte(hdr)) + tail)
		assert.ErrorIs(t, err, jose.ErrMalformed, hdr)
	}
	_, err := jose.Parse(enc([]byte(`{"alg":"dir","enc":"A256GCM","clevis":{"pin":"tpm2"}}`)) + tail)
	require.NoError(t, err, "the same header without them parses")
}

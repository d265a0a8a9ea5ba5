package clevis_test

import (
	"encoding/base64"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis/jose"
)

func tpm2Header(t *testing.T, compact string) map[string]string {
	t.Helper()
	j, err := jose.Parse(compact)
	require.NoError(t, err)
	var h struct {
		TPM2 map[string]string `json:"tpm2"`
	}
	require.NoError(t, json.Unmarshal(j.Header.Clevis, &h))
	require.NotNil(t, h.TPM2)
	return h.TPM2
}

func decodeB64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(s)
	require.NoError(t, err)
	return b
}

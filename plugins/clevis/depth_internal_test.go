package clevis

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis/jose"
)

// A compact JWE nested MaxDepth deep outgrows jose.MaxSize, so the depth
// check is exercised from inside: a two-level sss entered at MaxDepth-1
// must stop at the limit instead of recursing.
func TestSSSDepthLimit(t *testing.T) {
	seal := func(hdr string) string {
		j, err := jose.Seal(jose.Header{Alg: jose.AlgDir, Clevis: json.RawMessage(hdr)}, make([]byte, 32), []byte("x"))
		require.NoError(t, err)
		return j.Compact()
	}
	// 2^256 - 189, a prime: Decrypt refuses sss headers whose p is not one.
	prime := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 256), big.NewInt(189))
	p := base64.RawURLEncoding.EncodeToString(prime.FillBytes(make([]byte, 32)))
	inner := seal(fmt.Sprintf(`{"pin":"sss","sss":{"t":1,"p":%q,"jwe":[%q]}}`, p, seal(`{"pin":"yubikey"}`)))
	outer, err := jose.Parse(seal(fmt.Sprintf(`{"pin":"sss","sss":{"t":1,"p":%q,"jwe":[%q]}}`, p, inner)))
	require.NoError(t, err)

	c := New(nil, nil)
	_, err = c.decrypt(context.Background(), outer, MaxDepth-1)
	assert.ErrorIs(t, err, ErrThresholdNotMet)
	assert.ErrorIs(t, err, ErrMalformed)
	assert.Contains(t, err.Error(), "nested deeper than")

	// From the top the same JWE fails on the unsupported leaf pin instead.
	_, err = c.decrypt(context.Background(), outer, 0)
	assert.ErrorIs(t, err, ErrUnsupportedPin)
	assert.NotContains(t, err.Error(), "nested deeper than")
}

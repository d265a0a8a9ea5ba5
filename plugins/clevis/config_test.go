package clevis_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/clevis/jose"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/tpm"
)

func TestConfigJSONRoundTrip(t *testing.T) {
	cases := []struct{ pin, in, out string }{
		{"tpm2", `{}`, `{"hash":"sha256","key":"ecc"}`},
		{"tpm2", `{"pcr_ids":"7"}`, `{"hash":"sha256","key":"ecc","pcr_bank":"sha256","pcr_ids":"7"}`},
		{"tpm2", `{"pcr_bank":"sha1","pcr_ids":[0,7],"key":"rsa"}`, `{"hash":"sha256","key":"rsa","pcr_bank":"sha1","pcr_ids":"0,7"}`},
		{"tpm2", `{"pcr_ids":"0, 7"}`, `{"hash":"sha256","key":"ecc","pcr_bank":"sha256","pcr_ids":"0,7"}`},
		{"tang", `{"url":"http://t:8","thp":"abc"}`, `{"url":"http://t:8","thp":"abc"}`},
		{"tang", `{"url":"http://t:8","trust":true}`, `{"url":"http://t:8"}`}, // trust is ours, not clevis'
		{"sss", `{"t":2,"pins":{"tpm2":{},"tang":[{"url":"http://a","thp":"x"},{"url":"http://b","thp":"y"}]}}`,
			`{"pins":{"tang":[{"url":"http://a","thp":"x"},{"url":"http://b","thp":"y"}],"tpm2":[{"hash":"sha256","key":"ecc"}]},"t":2}`},
		{"sss", `{"pins":{"tpm2":[{}]}}`, `{"pins":{"tpm2":[{"hash":"sha256","key":"ecc"}]},"t":1}`},
	}
	for _, c := range cases {
		cfg, err := clevis.ParseConfig(c.pin, []byte(c.in))
		require.NoError(t, err, c.in)
		out, err := cfg.JSON()
		require.NoError(t, err)
		assert.JSONEq(t, c.out, string(out), c.in)
		if strings.Contains(c.in, "trust") {
			continue // clevis has no trust option: it prompts or takes -y
		}
		again, err := clevis.ParseConfig(c.pin, out)
		require.NoError(t, err, "output must parse again")
		out2, _ := again.JSON()
		assert.Equal(t, string(out), string(out2))
	}
}

func TestConfigValidation(t *testing.T) {
	cases := []struct{ pin, cfg string }{
		{"tpm2", `{"hash":"sha1"}`},
		{"tpm2", `{"key":"dsa"}`},
		{"tpm2", `{"pcr_ids":"7","pcr_bank":"md5"}`},
		{"tpm2", `{"pcr_ids":"24"}`},
		{"tpm2", `{"pcr_ids":"7,7"}`},
		{"tpm2", `{"pcr_ids":"x"}`},
		{"tpm2", `{"pcr_digest":"AAAA"}`},
		{"tpm2", `[]`},
		{"tang", `{}`},
		{"tang", `{"url":"ftp://x","thp":"a"}`},
		{"tang", `{"url":"http://x"}`},
		{"sss", `{"t":0,"pins":{"tpm2":{}}}`},
		{"sss", `{"t":3,"pins":{"tpm2":{},"tang":{"url":"http://x","thp":"a"}}}`},
		{"sss", `{"t":1,"pins":{"tpm2":"x"}}`},
		{"sss", `{"t":1,"pins":{"tang":{"url":"http://x"}}}`},
		{"sss", strings.Repeat(`{"t":1,"pins":{"sss":`, 25) + `{"t":1,"pins":{"tpm2":{}}}` + strings.Repeat(`}}`, 25)},
	}
	for _, c := range cases {
		_, err := clevis.ParseConfig(c.pin, []byte(c.cfg))
		assert.ErrorIs(t, err, clevis.ErrInvalidConfig, "%s %s", c.pin, c.cfg)
	}
	_, err := clevis.ParseConfig("yubikey", []byte(`{}`))
	assert.ErrorIs(t, err, clevis.ErrUnsupportedPin)
	_, err = clevis.ParseConfig("sss", []byte(`{"t":1,"pins":{"tpm1":{}}}`))
	assert.ErrorIs(t, err, clevis.ErrUnsupportedPin)
}

func sealedPublic() []byte {
	return tpm2.Marshal(tpm2.New2B(tpm2.TPMTPublic{
		Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique:     tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)}),
	}))
}

// fakeDir seals pt as a dir JWE with an arbitrary clevis header, to feed
// the decryptor shapes real pins never write.
func fakeDir(t *testing.T, clevisHdr string) string {
	t.Helper()
	j, err := jose.Seal(jose.Header{Alg: jose.AlgDir, Clevis: json.RawMessage(clevisHdr)}, make([]byte, 32), []byte("x"))
	require.NoError(t, err)
	return j.Compact()
}

// Malformed or hostile JWEs must fail with a kind, without a TPM or Tang
// (the client has neither) and without panicking.
func TestDecryptMalformed(t *testing.T) {
	c := clevis.New(nil, nil)
	ctx := context.Background()
	b64 := base64.RawURLEncoding.EncodeToString
	nested := fakeDir(t, `{"pin":"tpm2","tpm2":{"jwk_pub":"AA","jwk_priv":"AA"}}`)
	for i := 0; i < clevis.MaxDepth+2; i++ {
		nested = fakeDir(t, fmt.Sprintf(`{"pin":"sss","sss":{"t":1,"p":%q,"jwe":[%q]}}`, b64(testPrime), nested))
	}
	cases := map[string]struct {
		jwe  string
		kind error
	}{
		"not a JWE":          {"hello", clevis.ErrMalformed},
		"no clevis member":   {fakeDir(t, ``), clevis.ErrMalformed},
		"clevis not object":  {fakeDir(t, `"tpm2"`), clevis.ErrMalformed},
		"no pin":             {fakeDir(t, `{}`), clevis.ErrMalformed},
		"unknown pin":        {fakeDir(t, `{"pin":"yubikey"}`), clevis.ErrUnsupportedPin},
		"tpm2plus":           {fakeDir(t, `{"pin":"tpm2plus","tpm2plus":{}}`), clevis.ErrUnsupportedPin},
		"tpm2 no member":     {fakeDir(t, `{"pin":"tpm2"}`), clevis.ErrMalformed},
		"tpm2 bad base64":    {fakeDir(t, `{"pin":"tpm2","tpm2":{"jwk_pub":"!","jwk_priv":"!"}}`), clevis.ErrMalformed},
		"tpm2 not TPM2B":     {fakeDir(t, `{"pin":"tpm2","tpm2":{"jwk_pub":"AAAA","jwk_priv":"AAAA"}}`), clevis.ErrMalformed},
		"tpm2 sha1 bank bad": {fakeDir(t, `{"pin":"tpm2","tpm2":{"hash":"md5","jwk_pub":"AA","jwk_priv":"AA"}}`), clevis.ErrMalformed},
		"tpm2 no TPM":        {fakeDir(t, fmt.Sprintf(`{"pin":"tpm2","tpm2":{"jwk_pub":%q,"jwk_priv":"AAA"}}`, b64(sealedPublic()))), clevis.ErrTPMAbsent},
		"tang not ECDH-ES":   {fakeDir(t, `{"pin":"tang","tang":{"url":"http://x","adv":{"keys":[]}}}`), clevis.ErrMalformed},
		"sss bad p":          {fakeDir(t, `{"pin":"sss","sss":{"t":1,"p":"!","jwe":["a"]}}`), clevis.ErrMalformed},
		"sss t > shares":     {fakeDir(t, fmt.Sprintf(`{"pin":"sss","sss":{"t":2,"p":%q,"jwe":["a"]}}`, b64(testPrime))), clevis.ErrMalformed},
		"sss bad child":      {fakeDir(t, fmt.Sprintf(`{"pin":"sss","sss":{"t":1,"p":%q,"jwe":["a.b"]}}`, b64(testPrime))), clevis.ErrThresholdNotMet},
		"sss p not prime":    {fakeDir(t, fmt.Sprintf(`{"pin":"sss","sss":{"t":1,"p":%q,"jwe":["a.b"]}}`, b64(make([]byte, 32)))), clevis.ErrMalformed},
		"sss too deep/large": {nested, clevis.ErrMalformed}, // size limit trips first; depth: TestSSSDepthLimit
	}
	for name, tc := range cases {
		got, err := c.Decrypt(ctx, tc.jwe)
		assert.ErrorIs(t, err, tc.kind, name)
		assert.True(t, got.IsEmpty(), name)
	}
}

// The plaintext must never show up in an error or log line, whatever the
// formatting; secret.Bytes guarantees it, this checks we return one.
func TestEncryptWithoutTPMFailsClearly(t *testing.T) {
	c := clevis.New(tpm.Spec{Kind: tpm.KindDevice, Path: t.TempDir() + "/tpmrm0"}, nil)
	pt := secret.FromString("do-not-print-me")
	_, err := c.Encrypt(context.Background(), clevis.Config{Pin: "tpm2", TPM2: &clevis.TPM2Config{}}, pt)
	assert.ErrorIs(t, err, clevis.ErrTPMAbsent)
	assert.NotContains(t, err.Error(), "do-not-print-me")
	assert.Contains(t, err.Error(), "tpmrm0")
}

// testPrime is 2^256 - 189, the largest 256-bit prime: sss headers in
// these tests need a real prime, since Decrypt refuses anything else.
var testPrime = []byte{
	0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x43,
}

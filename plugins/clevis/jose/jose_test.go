package jose_test

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis/jose"
)

// RFC 7518 Appendix C: ECDH-ES key agreement, the only published vector
// for the Concat KDF as JOSE uses it.
func TestConcatKDFRFC7518AppendixC(t *testing.T) {
	z := []byte{158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156,
		251, 49, 110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196}
	got := jose.ConcatKDF(z, "A128GCM", []byte("Alice"), []byte("Bob"), 128)
	assert.Equal(t, "VqqN6vgjbSBcIijNcacQGg", base64.RawURLEncoding.EncodeToString(got))
}

// RFC 7638 §3.1 defines the thumbprint input; check it on an EC key with
// members in a different order and extra members, which must not matter.
func TestThumbprintIgnoresOrderAndExtraMembers(t *testing.T) {
	k := jose.JWK{Kty: "EC", Crv: "P-256", X: "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", Y: "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0", Alg: "ES256", KeyOps: []string{"verify"}}
	plain := jose.JWK{Kty: "EC", Crv: "P-256", X: k.X, Y: k.Y}
	a, err := k.Thumbprint(jose.ThpS256)
	require.NoError(t, err)
	b, err := plain.Thumbprint(jose.ThpS256)
	require.NoError(t, err)
	assert.Equal(t, a, b)
	assert.Len(t, a, 43)
	s1, err := k.Thumbprint(jose.ThpS1)
	require.NoError(t, err)
	assert.Len(t, s1, 27)
	assert.True(t, k.MatchesThumbprint(a))
	assert.True(t, k.MatchesThumbprint(s1))
	assert.False(t, k.MatchesThumbprint(a[:42]+"A"))
}

func TestSealOpenRoundTripAndTamper(t *testing.T) {
	cek := make([]byte, 32)
	_, _ = rand.Read(cek)
	j, err := jose.Seal(jose.Header{Alg: jose.AlgDir, Clevis: json.RawMessage(`{"pin":"x"}`)}, cek, []byte("hello"))
	require.NoError(t, err)
	compact := j.Compact()
	assert.False(t, strings.HasSuffix(compact, "\n"), "compact output must not end in a newline")
	assert.Equal(t, 1, strings.Count(compact, "..")) // empty encrypted_key as clevis writes it

	// Header keys are written sorted, like jose(1).
	hdr, _ := base64.RawURLEncoding.DecodeString(strings.Split(compact, ".")[0])
	assert.Equal(t, `{"alg":"dir","clevis":{"pin":"x"},"enc":"A256GCM"}`, string(hdr))

	for _, in := range []string{compact, compact + "\n", "  " + compact + "\r\n"} {
		p, err := jose.Parse(in)
		require.NoError(t, err)
		pt, err := p.Open(cek)
		require.NoError(t, err)
		assert.Equal(t, "hello", string(pt))
	}

	flat := j.Flattened()
	var m map[string]any
	require.NoError(t, json.Unmarshal(flat, &m))
	assert.Len(t, m, 5)
	assert.Equal(t, "", m["encrypted_key"])
	fj, err := jose.ParseFlattened(flat)
	require.NoError(t, err)
	assert.Equal(t, compact, fj.Compact())

	wrong := make([]byte, 32)
	_, err = j.Open(wrong)
	assert.ErrorIs(t, err, jose.ErrDecrypt)

	// Any change to the protected header (the AAD) must be detected, even
	// one that decodes to the same JSON meaning.
	parts := strings.Split(compact, ".")
	parts[0] = base64.RawURLEncoding.EncodeToString([]byte(`{"alg": "dir","clevis":{"pin":"x"},"enc":"A256GCM"}`))
	p2, err := jose.Parse(strings.Join(parts, "."))
	require.NoError(t, err)
	_, err = p2.Open(cek)
	assert.ErrorIs(t, err, jose.ErrDecrypt)
}

func TestParseRejectsMalformed(t *testing.T) {
	good, err := jose.Seal(jose.Header{Alg: jose.AlgDir}, make([]byte, 32), []byte("x"))
	require.NoError(t, err)
	parts := strings.Split(good.Compact(), ".")
	with := func(i int, v string) string {
		p := append([]string(nil), parts...)
		p[i] = v
		return strings.Join(p, ".")
	}
	b64 := base64.RawURLEncoding.EncodeToString
	cases := map[string]string{
		"empty":             "",
		"four parts":        strings.Join(parts[:4], "."),
		"six parts":         good.Compact() + ".x",
		"header not base64": with(0, "!!!"),
		"header not JSON":   with(0, b64([]byte("not json"))),
		"header array":      with(0, b64([]byte(`[1,2]`))),
		"header no alg":     with(0, b64([]byte(`{"enc":"A256GCM"}`))),
		"iv not base64":     with(2, "a*b"),
		"tag not base64":    with(4, "%%"),
		"oversized":         strings.Repeat("a", jose.MaxSize+1),
	}
	for name, in := range cases {
		_, err := jose.Parse(in)
		assert.ErrorIs(t, err, jose.ErrMalformed, name)
	}
	// Structurally valid but unusable for A256GCM: short iv, short tag,
	// other enc.
	for name, in := range map[string]string{
		"short iv":  with(2, b64([]byte("123"))),
		"short tag": with(4, b64([]byte("123"))),
		"enc A128":  with(0, b64([]byte(`{"alg":"dir","enc":"A128GCM"}`))),
	} {
		j, err := jose.Parse(in)
		require.NoError(t, err, name)
		_, err = j.Open(make([]byte, 32))
		assert.ErrorIs(t, err, jose.ErrMalformed, name)
	}
	for _, in := range []string{`{}`, `[]`, `{"protected":""}`, `nope`} {
		_, err := jose.ParseFlattened([]byte(in))
		assert.ErrorIs(t, err, jose.ErrMalformed, in)
	}
}

func TestPointRejectsOffCurve(t *testing.T) {
	priv, err := ecdh.P521().GenerateKey(rand.Reader)
	require.NoError(t, err)
	raw := priv.PublicKey().Bytes()
	k := jose.JWK{Kty: "EC", Crv: "P-521", X: base64.RawURLEncoding.EncodeToString(raw[1:67]), Y: base64.RawURLEncoding.EncodeToString(raw[67:])}
	_, _, _, err = k.Point()
	require.NoError(t, err)
	bad := raw[67:]
	bad[len(bad)-1] ^= 1
	k.Y = base64.RawURLEncoding.EncodeToString(bad)
	_, _, _, err = k.Point()
	assert.ErrorIs(t, err, jose.ErrMalformed)
	for _, k := range []jose.JWK{{Kty: "RSA"}, {Kty: "EC", Crv: "P-224"}, {Kty: "EC", Crv: "P-256", X: "!", Y: "A"}} {
		_, _, _, err := k.Point()
		assert.ErrorIs(t, err, jose.ErrMalformed, "%+v", k)
	}
}

// The ECDH-ES sender side and the McCallum-Relyea recovery must agree:
// recovering K = s·C through the blinded exchange gives the sender's key.
func TestECDHESMatchesMcCallumRelyea(t *testing.T) {
	c := elliptic.P521()
	s, err := jose.RandomScalar(c)
	require.NoError(t, err)
	sx, sy := jose.ScalarBaseMult(c, s)
	server := jose.ECJWK(c, sx, sy)
	epk, cek, err := jose.ECDHESKey(server)
	require.NoError(t, err)

	_, cx, cy, err := epk.Point()
	require.NoError(t, err)
	e, err := jose.RandomScalar(c)
	require.NoError(t, err)
	ex, ey := jose.ScalarBaseMult(c, e)
	xx, xy := jose.AddPoints(c, cx, cy, ex, ey)
	yx, yy := jose.ScalarMult(c, xx, xy, s) // what tangd does
	zx, zy := jose.ScalarMult(c, sx, sy, e)
	kx, _ := jose.SubPoints(c, yx, yy, zx, zy)
	assert.Equal(t, cek, jose.DirectKDF(jose.FieldBytes(c, kx)))
}

func TestJWSVerify(t *testing.T) {
	priv, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	require.NoError(t, err)
	pub := jose.ECJWK(elliptic.P521(), priv.X, priv.Y)
	pub.KeyOps = []string{"verify"}
	payload := base64.RawURLEncoding.EncodeToString([]byte(`{"keys":[]}`))
	prot := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES512","cty":"jwk-set+json"}`))
	h := sha512.Sum512([]byte(prot + "." + payload))
	r, s, err := ecdsa.Sign(rand.Reader, priv, h[:])
	require.NoError(t, err)
	sig := append(r.FillBytes(make([]byte, 66)), s.FillBytes(make([]byte, 66))...)
	flat, _ := json.Marshal(map[string]string{"payload": payload, "protected": prot, "signature": base64.RawURLEncoding.EncodeToString(sig)})
	general, _ := json.Marshal(map[string]any{"payload": payload, "signatures": []map[string]string{{"protected": prot, "signature": base64.RawURLEncoding.EncodeToString(sig)}}})
	other, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	for _, in := range [][]byte{flat, general} {
		j, err := jose.ParseJWS(in)
		require.NoError(t, err)
		assert.True(t, j.VerifiedBy(pub))
		assert.False(t, j.VerifiedBy(jose.ECJWK(elliptic.P521(), other.X, other.Y)))
	}
	// A flipped payload bit must break the signature.
	tampered := strings.Replace(string(flat), payload, base64.RawURLEncoding.EncodeToString([]byte(`{"keys":[1]}`)), 1)
	j, err := jose.ParseJWS([]byte(tampered))
	require.NoError(t, err)
	assert.False(t, j.VerifiedBy(pub))
}

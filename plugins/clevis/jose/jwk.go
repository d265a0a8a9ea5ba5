package jose

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha1" // S1 thumbprints: old Tang servers and clevis still accept them
	"crypto/sha256"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"hash"
	"math/big"
)

// JWK holds the public members clevis and Tang use. Private members ("d",
// "k") never pass through this type: secrets stay in secret.Bytes.
type JWK struct {
	Alg    string   `json:"alg,omitempty"`
	Crv    string   `json:"crv,omitempty"`
	KeyOps []string `json:"key_ops,omitempty"`
	Kty    string   `json:"kty"`
	X      string   `json:"x,omitempty"`
	Y      string   `json:"y,omitempty"`
}

// JWKSet is a Tang advertisement payload.
type JWKSet struct {
	Keys []JWK `json:"keys"`
}

// HasOp reports whether the key lists op in key_ops.
func (k JWK) HasOp(op string) bool {
	for _, o := range k.KeyOps {
		if o == op {
			return true
		}
	}
	return false
}

// Curve returns the elliptic curve named by crv.
func (k JWK) Curve() (elliptic.Curve, error) {
	if k.Kty != "EC" {
		return nil, fmt.Errorf("%w: key type %q, want EC", ErrMalformed, k.Kty)
	}
	switch k.Crv {
	case "P-256":
		return elliptic.P256(), nil
	case "P-384":
		return elliptic.P384(), nil
	case "P-521":
		return elliptic.P521(), nil
	}
	return nil, fmt.Errorf("%w: unsupported curve %q", ErrMalformed, k.Crv)
}

// Point decodes x and y and checks that they are on the curve: a point off
// the curve fed to the exchange math could leak key bits (invalid-curve
// attack) or crash crypto/elliptic.
func (k JWK) Point() (elliptic.Curve, *big.Int, *big.Int, error) {
	c, err := k.Curve()
	if err != nil {
		return nil, nil, nil, err
	}
	xb, err := decodeField("x", k.X)
	if err != nil {
		return nil, nil, nil, err
	}
	yb, err := decodeField("y", k.Y)
	if err != nil {
		return nil, nil, nil, err
	}
	// crypto/ecdh's NewPublicKey checks that the point is on the curve (and
	// not the point at infinity); crypto/elliptic's IsOnCurve is deprecated.
	if _, err := ecdhCurve(k.Crv).NewPublicKey(uncompressed(xb, yb)); err != nil {
		return nil, nil, nil, fmt.Errorf("%w: EC point is not on %s", ErrMalformed, k.Crv)
	}
	return c, new(big.Int).SetBytes(xb), new(big.Int).SetBytes(yb), nil
}

// uncompressed is the SEC 1 encoding 0x04 || x || y of same-size coordinates.
func uncompressed(x, y []byte) []byte {
	raw := make([]byte, 0, 1+len(x)+len(y))
	raw = append(raw, 4)
	raw = append(raw, x...)
	return append(raw, y...)
}

// ecdhCurve is the crypto/ecdh curve of a JWK curve name that Curve has
// already accepted.
func ecdhCurve(crv string) ecdh.Curve {
	switch crv {
	case "P-256":
		return ecdh.P256()
	case "P-384":
		return ecdh.P384()
	default:
		return ecdh.P521()
	}
}

// ECJWK builds the public JWK of a point.
func ECJWK(c elliptic.Curve, x, y *big.Int) JWK {
	size := (c.Params().BitSize + 7) / 8
	return JWK{Kty: "EC", Crv: c.Params().Name, X: b64.EncodeToString(x.FillBytes(make([]byte, size))),
		Y: b64.EncodeToString(y.FillBytes(make([]byte, size)))}
}

// ECDHPublic converts the JWK to a crypto/ecdh key (for ECDH-ES encryption).
func (k JWK) ECDHPublic() (*ecdh.PublicKey, error) {
	raw, err := k.pointBytes()
	if err != nil {
		return nil, err
	}
	return ecdhCurve(k.Crv).NewPublicKey(raw)
}

// ECDSAPublic converts the JWK to an ECDSA verification key.
func (k JWK) ECDSAPublic() (*ecdsa.PublicKey, error) {
	raw, err := k.pointBytes()
	if err != nil {
		return nil, err
	}
	c, _ := k.Curve()
	return ecdsa.ParseUncompressedPublicKey(c, raw)
}

// pointBytes is the checked point of the JWK in SEC 1 uncompressed form.
func (k JWK) pointBytes() ([]byte, error) {
	c, x, y, err := k.Point()
	if err != nil {
		return nil, err
	}
	size := (c.Params().BitSize + 7) / 8
	return uncompressed(x.FillBytes(make([]byte, size)), y.FillBytes(make([]byte, size))), nil
}

// Thumbprint algorithms as clevis names them (jose jwk thp -a).
const (
	ThpS256 = "S256"
	ThpS1   = "S1"
)

// Thumbprint is the RFC 7638 thumbprint (base64url) of an EC key: the hash
// of {"crv","kty","x","y"} in that order without whitespace.
func (k JWK) Thumbprint(alg string) (string, error) {
	var h hash.Hash
	switch alg {
	case ThpS256:
		h = sha256.New()
	case ThpS1:
		h = sha1.New()
	case "S512":
		h = sha512.New()
	default:
		return "", fmt.Errorf("unsupported thumbprint algorithm %q", alg)
	}
	if k.Kty != "EC" {
		return "", fmt.Errorf("%w: thumbprint of a %q key is not supported", ErrMalformed, k.Kty)
	}
	canon, err := json.Marshal(struct {
		Crv string `json:"crv"`
		Kty string `json:"kty"`
		X   string `json:"x"`
		Y   string `json:"y"`
	}{k.Crv, k.Kty, k.X, k.Y})
	if err != nil {
		return "", err
	}
	h.Write(canon)
	return b64.EncodeToString(h.Sum(nil)), nil
}

// MatchesThumbprint reports whether thp is this key's S256 or S1
// thumbprint (clevis accepts both, S256 first).
func (k JWK) MatchesThumbprint(thp string) bool {
	for _, alg := range []string{ThpS256, ThpS1} {
		if t, err := k.Thumbprint(alg); err == nil && t == thp {
			return true
		}
	}
	return false
}

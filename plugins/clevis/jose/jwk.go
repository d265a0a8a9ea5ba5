package jose

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha1" //nolint:gosec // S1 thumbprints: old Tang servers and clevis still accept them
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
	x, y := new(big.Int).SetBytes(xb), new(big.Int).SetBytes(yb)
	if !c.IsOnCurve(x, y) { //nolint:staticcheck // no non-deprecated API validates affine points
		return nil, nil, nil, fmt.Errorf("%w: EC point is not on %s", ErrMalformed, k.Crv)
	}
	return c, x, y, nil
}

// ECJWK builds the public JWK of a point.
func ECJWK(c elliptic.Curve, x, y *big.Int) JWK {
	size := (c.Params().BitSize + 7) / 8
	return JWK{Kty: "EC", Crv: c.Params().Name, X: b64.EncodeToString(x.FillBytes(make([]byte, size))),
		Y: b64.EncodeToString(y.FillBytes(make([]byte, size)))}
}

// ECDHPublic converts the JWK to a crypto/ecdh key (for ECDH-ES encryption).
func (k JWK) ECDHPublic() (*ecdh.PublicKey, error) {
	c, x, y, err := k.Point()
	if err != nil {
		return nil, err
	}
	size := (c.Params().BitSize + 7) / 8
	raw := append([]byte{4}, x.FillBytes(make([]byte, size))...)
	raw = append(raw, y.FillBytes(make([]byte, size))...)
	var curve ecdh.Curve
	switch k.Crv {
	case "P-256":
		curve = ecdh.P256()
	case "P-384":
		curve = ecdh.P384()
	default:
		curve = ecdh.P521()
	}
	return curve.NewPublicKey(raw)
}

// ECDSAPublic converts the JWK to an ECDSA verification key.
func (k JWK) ECDSAPublic() (*ecdsa.PublicKey, error) {
	c, x, y, err := k.Point()
	if err != nil {
		return nil, err
	}
	return &ecdsa.PublicKey{Curve: c, X: x, Y: y}, nil
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
		h = sha1.New() //nolint:gosec
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

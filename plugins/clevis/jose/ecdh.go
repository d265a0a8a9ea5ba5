package jose

import (
	"crypto/ecdh"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/big"
)

// ConcatKDF derives a key from an ECDH shared secret z as RFC 7518 §4.6
// does (NIST SP 800-56A Concat KDF with SHA-256). For clevis' direct key
// agreement alg is the enc value "A256GCM", apu/apv are empty (clevis sends
// none) and keyBits is 256. Key lengths up to 256 bits need one round.
func ConcatKDF(z []byte, alg string, apu, apv []byte, keyBits int) []byte {
	h := sha256.New()
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], 1)
	h.Write(n[:])
	h.Write(z)
	lp := func(b []byte) {
		binary.BigEndian.PutUint32(n[:], uint32(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	lp([]byte(alg))
	lp(apu)
	lp(apv)
	binary.BigEndian.PutUint32(n[:], uint32(keyBits))
	h.Write(n[:])
	return h.Sum(nil)[:keyBits/8]
}

// DirectKDF is ConcatKDF as clevis uses it for ECDH-ES + A256GCM.
func DirectKDF(z []byte) []byte { return ConcatKDF(z, EncA256GCM, nil, nil, 256) }

// ECDHESKey performs the sender side of ECDH-ES to recipient: it returns
// the ephemeral public JWK (the "epk" header) and the derived content key.
func ECDHESKey(recipient JWK) (JWK, []byte, error) {
	pub, err := recipient.ECDHPublic()
	if err != nil {
		return JWK{}, nil, err
	}
	eph, err := pub.Curve().GenerateKey(rand.Reader)
	if err != nil {
		return JWK{}, nil, fmt.Errorf("generating ephemeral key: %w", err)
	}
	z, err := eph.ECDH(pub)
	if err != nil {
		return JWK{}, nil, fmt.Errorf("ECDH: %w", err)
	}
	defer wipe(z)
	epk, err := jwkFromECDH(eph.PublicKey(), recipient.Crv)
	if err != nil {
		return JWK{}, nil, err
	}
	return epk, DirectKDF(z), nil
}

func jwkFromECDH(p *ecdh.PublicKey, crv string) (JWK, error) {
	raw := p.Bytes()
	size := (len(raw) - 1) / 2
	return JWK{Kty: "EC", Crv: crv, X: b64.EncodeToString(raw[1 : 1+size]), Y: b64.EncodeToString(raw[1+size:])}, nil
}

// Point arithmetic for the McCallum-Relyea exchange, which needs point
// addition, subtraction and the full point of k·P; crypto/ecdh offers only
// k·G and the x coordinate of k·P. crypto/elliptic is used for those alone;
// every input is checked to be on the curve (JWK.Point) before it gets here.

// AddPoints returns a + b.
func AddPoints(c elliptic.Curve, ax, ay, bx, by *big.Int) (*big.Int, *big.Int) {
	//lint:ignore SA1019 no replacement in the standard library for point addition (McCallum-Relyea)
	return c.Add(ax, ay, bx, by)
}

// SubPoints returns a - b (b negated: y -> p - y).
func SubPoints(c elliptic.Curve, ax, ay, bx, by *big.Int) (*big.Int, *big.Int) {
	ny := new(big.Int).Sub(c.Params().P, by)
	ny.Mod(ny, c.Params().P)
	//lint:ignore SA1019 no replacement in the standard library for point addition (McCallum-Relyea)
	return c.Add(ax, ay, bx, ny)
}

// ScalarMult returns k·(x, y).
func ScalarMult(c elliptic.Curve, x, y *big.Int, k []byte) (*big.Int, *big.Int) {
	//lint:ignore SA1019 crypto/ecdh returns only the x coordinate of k·P; McCallum-Relyea needs the point
	return c.ScalarMult(x, y, k)
}

// ScalarBaseMult returns k·G for a scalar k in [1, n-1] (RandomScalar's
// range), through crypto/ecdh: the public key of private key k is k·G.
func ScalarBaseMult(c elliptic.Curve, k []byte) (*big.Int, *big.Int) {
	priv, err := ecdhCurve(c.Params().Name).NewPrivateKey(k)
	if err != nil {
		// Only a scalar outside [1, n-1] gets here: a programming error,
		// since every caller takes k from RandomScalar.
		panic(fmt.Sprintf("jose: scalar out of range for %s", c.Params().Name))
	}
	raw := priv.PublicKey().Bytes()
	size := (len(raw) - 1) / 2
	return new(big.Int).SetBytes(raw[1 : 1+size]), new(big.Int).SetBytes(raw[1+size:])
}

// RandomScalar returns a uniformly random scalar in [1, n-1] as big-endian
// bytes of the curve's order size.
func RandomScalar(c elliptic.Curve) ([]byte, error) {
	n := c.Params().N
	for {
		k, err := rand.Int(rand.Reader, n)
		if err != nil {
			return nil, err
		}
		if k.Sign() > 0 {
			return k.FillBytes(make([]byte, (n.BitLen()+7)/8)), nil
		}
	}
}

// FieldBytes encodes a coordinate left-padded to the field size, which is
// how the ECDH shared secret Z is fed to the KDF.
func FieldBytes(c elliptic.Curve, v *big.Int) []byte {
	return v.FillBytes(make([]byte, (c.Params().BitSize+7)/8))
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

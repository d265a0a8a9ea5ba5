package jose

import (
	"crypto"
	"crypto/ecdsa"
	"encoding/json"
	"fmt"
	"math/big"
)

// ErrSignature means a JWS did not verify.
var ErrSignature = fmt.Errorf("JWS signature verification failed")

// JWS is a parsed flattened or general JSON JWS, as Tang serves /adv: with
// one signing key tangd writes the flattened form, with several the
// general form with a "signatures" array.
type JWS struct {
	Payload    string
	Signatures []JWSSignature
}

// JWSSignature is one signature and its protected header as transmitted.
type JWSSignature struct {
	Protected string `json:"protected"`
	Signature string `json:"signature"`
}

// ParseJWS reads the JSON serialisation (flattened or general).
func ParseJWS(data []byte) (*JWS, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: JWS is %d bytes", ErrMalformed, len(data))
	}
	var raw struct {
		Payload    string         `json:"payload"`
		Protected  string         `json:"protected"`
		Signature  string         `json:"signature"`
		Signatures []JWSSignature `json:"signatures"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%w: JWS: %v", ErrMalformed, err)
	}
	j := &JWS{Payload: raw.Payload, Signatures: raw.Signatures}
	if raw.Signature != "" {
		j.Signatures = append(j.Signatures, JWSSignature{Protected: raw.Protected, Signature: raw.Signature})
	}
	if j.Payload == "" || len(j.Signatures) == 0 {
		return nil, fmt.Errorf("%w: JWS needs a payload and at least one signature", ErrMalformed)
	}
	return j, nil
}

// PayloadBytes decodes the payload. Only call after Verify succeeded if
// the content must be trusted.
func (j *JWS) PayloadBytes() ([]byte, error) { return decodeField("JWS payload", j.Payload) }

// VerifiedBy reports whether some signature verifies with key.
func (j *JWS) VerifiedBy(key JWK) bool {
	pub, err := key.ECDSAPublic()
	if err != nil {
		return false
	}
	for _, s := range j.Signatures {
		if verifyES(pub, s, j.Payload) == nil {
			return true
		}
	}
	return false
}

func verifyES(pub *ecdsa.PublicKey, s JWSSignature, payload string) error {
	hdrb, err := decodeField("JWS protected header", s.Protected)
	if err != nil {
		return err
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	if err := json.Unmarshal(hdrb, &hdr); err != nil {
		return fmt.Errorf("%w: JWS header: %v", ErrMalformed, err)
	}
	var h crypto.Hash
	switch {
	case hdr.Alg == "ES256" && pub.Curve.Params().Name == "P-256":
		h = crypto.SHA256
	case hdr.Alg == "ES384" && pub.Curve.Params().Name == "P-384":
		h = crypto.SHA384
	case hdr.Alg == "ES512" && pub.Curve.Params().Name == "P-521":
		h = crypto.SHA512
	default:
		return fmt.Errorf("%w: JWS algorithm %q does not fit a %s key", ErrSignature, hdr.Alg, pub.Curve.Params().Name)
	}
	sig, err := decodeField("JWS signature", s.Signature)
	if err != nil {
		return err
	}
	size := (pub.Curve.Params().BitSize + 7) / 8
	if len(sig) != 2*size {
		return fmt.Errorf("%w: signature is %d bytes, want %d", ErrSignature, len(sig), 2*size)
	}
	hh := h.New()
	hh.Write([]byte(s.Protected + "." + payload))
	r, ss := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
	if !ecdsa.Verify(pub, hh.Sum(nil), r, ss) {
		return ErrSignature
	}
	return nil
}

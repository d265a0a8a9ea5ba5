// Package jose is the narrow subset of JOSE that clevis uses, written so
// that `clevis decrypt` reads what we write and we read what clevis writes:
// compact and flattened JWE with "dir" or "ECDH-ES" key management and
// A256GCM content encryption, EC and oct JWKs with RFC 7638 thumbprints,
// ES256/384/512 JWS verification (Tang advertisements), and the Concat KDF.
//
// A general JOSE library would also do, but none reproduces jose(1)'s
// output byte for byte, and a full library brings a large attack surface
// into a process that handles disk keys. The rules that matter for interop:
//   - the AES-GCM AAD is the protected header exactly as transmitted;
//   - compact output carries no trailing newline (clevis decrypt prints the
//     plaintext and then fails the tag check if one is there);
//   - header members are written in sorted order, like jose does.
package jose

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// ErrMalformed is wrapped by every parse error: the input is not a JWE,
// JWK or JWS of the shape clevis produces.
var ErrMalformed = errors.New("malformed JOSE object")

// ErrDecrypt means the ciphertext did not authenticate with the key: the
// wrong key, or tampered data.
var ErrDecrypt = errors.New("JWE authentication failed (wrong key or corrupted data)")

// Algorithms used by clevis.
const (
	AlgDir     = "dir"
	AlgECDHES  = "ECDH-ES"
	EncA256GCM = "A256GCM"
)

// Header is the protected header members we read or write. Field order is
// alphabetical so that encoding/json writes keys sorted, as jose does.
type Header struct {
	Alg    string          `json:"alg"`
	Clevis json.RawMessage `json:"clevis,omitempty"`
	Enc    string          `json:"enc,omitempty"`
	EPK    *JWK            `json:"epk,omitempty"`
	Kid    string          `json:"kid,omitempty"`
}

// JWE is one parsed JWE. Protected is kept as received because it is the
// AAD; Header is its decoded form.
type JWE struct {
	Protected    string
	Header       Header
	EncryptedKey []byte
	IV           []byte
	Ciphertext   []byte
	Tag          []byte
}

// MaxSize bounds what Parse accepts. Real clevis JWEs are 1-4 KiB (an sss
// of several Tang servers a bit more); a LUKS2 token area is 16 KiB at most
// by default, luksmeta's a few pages.
const MaxSize = 256 << 10

var b64 = base64.RawURLEncoding

// Parse reads a compact JWE (five base64url parts). Surrounding whitespace
// is tolerated, because files and shell captures often end in a newline.
func Parse(compact string) (*JWE, error) {
	compact = strings.TrimSpace(compact)
	if len(compact) > MaxSize {
		return nil, fmt.Errorf("%w: JWE is %d bytes, more than %d", ErrMalformed, len(compact), MaxSize)
	}
	parts := strings.Split(compact, ".")
	if len(parts) != 5 {
		return nil, fmt.Errorf("%w: compact JWE has %d parts, want 5", ErrMalformed, len(parts))
	}
	return fromParts(parts[0], parts[1], parts[2], parts[3], parts[4])
}

func fromParts(protected, ek, iv, ct, tag string) (*JWE, error) {
	j := &JWE{Protected: protected}
	hdr, err := decodeField("protected header", protected)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(hdr))
	if err := dec.Decode(&j.Header); err != nil {
		return nil, fmt.Errorf("%w: protected header is not a JSON object: %v", ErrMalformed, err)
	}
	if j.Header.Alg == "" {
		return nil, fmt.Errorf("%w: protected header has no \"alg\"", ErrMalformed)
	}
	// clevis never compresses and never marks extensions critical. Ignoring
	// either would hand back something other than the key (compressed
	// bytes) or skip a check the writer demanded, so refuse them.
	var unsupported struct {
		Zip  json.RawMessage `json:"zip"`
		Crit json.RawMessage `json:"crit"`
	}
	if json.Unmarshal(hdr, &unsupported) == nil && (unsupported.Zip != nil || unsupported.Crit != nil) {
		return nil, fmt.Errorf("%w: protected header uses \"zip\" or \"crit\", which clevis never writes", ErrMalformed)
	}
	for _, f := range []struct {
		name string
		in   string
		out  *[]byte
	}{{"encrypted key", ek, &j.EncryptedKey}, {"iv", iv, &j.IV}, {"ciphertext", ct, &j.Ciphertext}, {"tag", tag, &j.Tag}} {
		if *f.out, err = decodeField(f.name, f.in); err != nil {
			return nil, err
		}
	}
	return j, nil
}

func decodeField(name, s string) ([]byte, error) {
	// jose never pads, but some writers do; padding carries no information.
	b, err := b64.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not base64url: %v", ErrMalformed, name, err)
	}
	return b, nil
}

// Compact serialises without a trailing newline.
func (j *JWE) Compact() string {
	return strings.Join([]string{j.Protected, b64.EncodeToString(j.EncryptedKey),
		b64.EncodeToString(j.IV), b64.EncodeToString(j.Ciphertext), b64.EncodeToString(j.Tag)}, ".")
}

// flattened is the JSON form clevis stores in a LUKS2 token's "jwe" member
// (`jose jwe fmt -i <compact>`): exactly these five members.
type flattened struct {
	Ciphertext   string `json:"ciphertext"`
	EncryptedKey string `json:"encrypted_key"`
	IV           string `json:"iv"`
	Protected    string `json:"protected"`
	Tag          string `json:"tag"`
}

// ParseFlattened reads the flattened JSON serialisation.
func ParseFlattened(data []byte) (*JWE, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: JWE is %d bytes, more than %d", ErrMalformed, len(data), MaxSize)
	}
	var f flattened
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: flattened JWE: %v", ErrMalformed, err)
	}
	if f.Protected == "" {
		return nil, fmt.Errorf("%w: flattened JWE has no \"protected\" member", ErrMalformed)
	}
	return fromParts(f.Protected, f.EncryptedKey, f.IV, f.Ciphertext, f.Tag)
}

// Flattened serialises as clevis stores it in a LUKS2 token.
func (j *JWE) Flattened() []byte {
	out, _ := json.Marshal(flattened{
		Ciphertext: b64.EncodeToString(j.Ciphertext), EncryptedKey: b64.EncodeToString(j.EncryptedKey),
		IV: b64.EncodeToString(j.IV), Protected: j.Protected, Tag: b64.EncodeToString(j.Tag),
	})
	return out
}

// Seal encrypts plaintext with a 32-byte content key under A256GCM, with
// hdr as the protected header (Enc is set to A256GCM).
func Seal(hdr Header, cek, plaintext []byte) (*JWE, error) {
	hdr.Enc = EncA256GCM
	hj, err := json.Marshal(hdr)
	if err != nil {
		return nil, fmt.Errorf("encoding JWE header: %w", err)
	}
	gcm, err := newGCM(cek)
	if err != nil {
		return nil, err
	}
	j := &JWE{Protected: b64.EncodeToString(hj), Header: hdr, IV: make([]byte, gcm.NonceSize())}
	if _, err := rand.Read(j.IV); err != nil {
		return nil, fmt.Errorf("generating IV: %w", err)
	}
	sealed := gcm.Seal(nil, j.IV, plaintext, []byte(j.Protected))
	n := len(sealed) - gcm.Overhead()
	j.Ciphertext, j.Tag = sealed[:n], sealed[n:]
	return j, nil
}

// Open decrypts with a 32-byte content key. The caller owns (and should
// wipe) the returned plaintext.
func (j *JWE) Open(cek []byte) ([]byte, error) {
	if j.Header.Enc != EncA256GCM {
		return nil, fmt.Errorf("%w: content encryption %q, only %s is supported", ErrMalformed, j.Header.Enc, EncA256GCM)
	}
	gcm, err := newGCM(cek)
	if err != nil {
		return nil, err
	}
	if len(j.IV) != gcm.NonceSize() || len(j.Tag) != gcm.Overhead() {
		return nil, fmt.Errorf("%w: A256GCM needs a 12-byte iv and a 16-byte tag, got %d and %d", ErrMalformed, len(j.IV), len(j.Tag))
	}
	in := make([]byte, 0, len(j.Ciphertext)+len(j.Tag))
	in = append(append(in, j.Ciphertext...), j.Tag...)
	pt, err := gcm.Open(nil, j.IV, in, []byte(j.Protected))
	if err != nil {
		return nil, ErrDecrypt
	}
	return pt, nil
}

func newGCM(cek []byte) (cipher.AEAD, error) {
	if len(cek) != 32 {
		return nil, fmt.Errorf("A256GCM needs a 32-byte key, got %d bytes", len(cek))
	}
	block, err := aes.NewCipher(cek)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

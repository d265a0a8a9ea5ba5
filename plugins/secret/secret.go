// Package secret holds key material (passphrases, unsealed keys, JWKs) in a
// byte type that refuses to be printed, marshalled or logged, and that is
// wiped when the holder is done with it.
//
// Every formatting path (%v, %s, %q, %x, %#v, String, GoString, JSON, text)
// yields "[redacted]"; the only way to read the bytes is Expose, which makes
// each place that touches the secret easy to find with grep.
package secret

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"runtime"
)

// Redacted is what every formatting path prints instead of the secret.
const Redacted = "[redacted]"

// Bytes is a secret byte string. The zero value is an empty secret.
type Bytes struct {
	b []byte
}

// New takes ownership of b: the caller must not keep or reuse it.
func New(b []byte) Bytes { return Bytes{b: b} }

// FromString copies s into a new secret. The string itself cannot be wiped,
// so prefer New where the source is a []byte.
func FromString(s string) Bytes { return Bytes{b: []byte(s)} }

// Random returns n bytes from crypto/rand.
func Random(n int) (Bytes, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return Bytes{}, fmt.Errorf("reading random bytes: %w", err)
	}
	return Bytes{b: b}, nil
}

// RandomHex returns n random bytes encoded as 2n lower-case hex characters.
// LUKS keyslot passphrases are kept printable so that an administrator can
// feed them to cryptsetup by hand if ever needed (Ignition/ceph-csi habit).
func RandomHex(n int) (Bytes, error) {
	r, err := Random(n)
	if err != nil {
		return Bytes{}, err
	}
	defer r.Wipe()
	out := make([]byte, hex.EncodedLen(n))
	hex.Encode(out, r.b)
	return Bytes{b: out}, nil
}

// Expose returns the underlying bytes. The slice aliases the secret: it is
// zeroed by Wipe, and must not be stored beyond the secret's lifetime.
func (s Bytes) Expose() []byte { return s.b }

// Len is the length of the secret in bytes; it is not itself secret.
func (s Bytes) Len() int { return len(s.b) }

// IsEmpty reports whether the secret holds no bytes.
func (s Bytes) IsEmpty() bool { return len(s.b) == 0 }

// Clone returns an independent copy that must be wiped separately.
func (s Bytes) Clone() Bytes {
	if s.b == nil {
		return Bytes{}
	}
	c := make([]byte, len(s.b))
	copy(c, s.b)
	return Bytes{b: c}
}

// Equal compares in constant time.
func (s Bytes) Equal(o Bytes) bool { return subtle.ConstantTimeCompare(s.b, o.b) == 1 }

// Wipe zeroes the bytes in place. Safe to call more than once and on the
// zero value.
func (s Bytes) Wipe() {
	for i := range s.b {
		s.b[i] = 0
	}
	// Keep the zeroing from being optimised away.
	runtime.KeepAlive(s.b)
}

func (s Bytes) String() string                { return Redacted }
func (s Bytes) GoString() string              { return Redacted }
func (s Bytes) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(Redacted)) }
func (s Bytes) MarshalJSON() ([]byte, error)  { return []byte(`"` + Redacted + `"`), nil }
func (s Bytes) MarshalText() ([]byte, error)  { return []byte(Redacted), nil }
func (s *Bytes) UnmarshalJSON(_ []byte) error {
	return fmt.Errorf("secret: refusing to unmarshal a secret from JSON")
}

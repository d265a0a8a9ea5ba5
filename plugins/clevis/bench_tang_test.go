//go:build bench

package clevis_test

import (
	"fmt"
	"testing"
)

// TestBenchTangAndSSSDecrypt times our Decrypt against `clevis decrypt`
// of the same clevis-made JWE, for tang and for sss t=2 of {tpm2, tang},
// against the same loopback tangd and swtpm.
func TestBenchTangAndSSSDecrypt(t *testing.T) {
	f := newFixture(t, true)
	pt := newPlaintext(t)
	tang := fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp)
	cases := []struct{ name, pin, cfg string }{
		{"tang-decrypt", "tang", tang},
		{"sss2-tpm2-tang-decrypt", "sss", fmt.Sprintf(`{"t":2,"pins":{"tpm2":{},"tang":%s}}`, tang)},
	}
	const n = 5
	for _, c := range cases {
		f.benchDecrypt(t, c.name, f.clevisEncrypt(c.pin, c.cfg, pt.Expose()), pt, n)
	}
}

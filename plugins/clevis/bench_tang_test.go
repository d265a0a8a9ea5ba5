//go:build bench

package clevis_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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
		jwe := f.clevisEncrypt(c.pin, c.cfg, pt.Expose())
		start := time.Now()
		for i := 0; i < n; i++ {
			got, err := f.c.Decrypt(f.ctx(), jwe)
			require.NoError(t, err)
			require.True(t, pt.Equal(got))
			got.Wipe()
		}
		ours := time.Since(start) / n

		// As in the tpm2 benchmark, f.clevis flushes the TPM after each
		// call (no resource manager); that cost is measured and removed.
		start = time.Now()
		for i := 0; i < n; i++ {
			f.sw.FlushAll(t)
		}
		flush := time.Since(start) / n
		start = time.Now()
		for i := 0; i < n; i++ {
			out, err := f.clevisDecrypt(jwe)
			require.NoError(t, err)
			require.Equal(t, string(pt.Expose()), string(out))
		}
		theirs := time.Since(start)/n - flush

		fmt.Printf("BENCH %s luksext_ms=%.1f\n", c.name, ms(ours))
		fmt.Printf("BENCH %s clevis_decrypt_ms=%.1f\n", c.name, ms(theirs))
		fmt.Printf("BENCH %s ratio_clevis_over_luksext=%.1f iterations=%d\n", c.name, float64(theirs)/float64(ours), n)
	}
}

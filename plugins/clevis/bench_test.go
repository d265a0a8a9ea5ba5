//go:build bench

package clevis_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/secret"
)

// TestBenchTPM2Unseal times our tpm2 Decrypt against `clevis decrypt` of
// the same JWE on the same swtpm (PCR 7 policy, the common case), and
// prints one BENCH line per figure plus the ratio.
func TestBenchTPM2UnsealPCR7(t *testing.T) {
	f := newFixture(t, false)
	pt := newPlaintext(t)
	jwe := f.clevisEncrypt("tpm2", `{"pcr_bank":"sha256","pcr_ids":"7"}`, pt.Expose())
	const n = 10

	// Warm up both paths once (page cache, TPM object slots).
	got, err := f.c.Decrypt(f.ctx(), jwe)
	require.NoError(t, err)
	require.True(t, pt.Equal(got))
	_, err = f.clevisDecrypt(jwe)
	require.NoError(t, err)

	f.benchDecrypt(t, "tpm2-unseal-pcr7", jwe, pt, n)
}

// benchDecrypt times our Decrypt and `clevis decrypt` of the same JWE n
// times each and prints the BENCH lines. clevis' time includes the
// tpm2_flushcontext cleanup the harness must run after it on a TPM without
// resource manager; that cost is measured alone and subtracted, so clevis
// is not charged for it.
func (f *fixture) benchDecrypt(t *testing.T, name, jwe string, pt secret.Bytes, n int) {
	t.Helper()
	start := time.Now()
	for i := 0; i < n; i++ {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.NoError(t, err)
		require.True(t, pt.Equal(got))
		got.Wipe()
	}
	ours := time.Since(start) / time.Duration(n)
	start = time.Now()
	for i := 0; i < n; i++ {
		f.sw.FlushAll(t)
	}
	flush := time.Since(start) / time.Duration(n)
	start = time.Now()
	for i := 0; i < n; i++ {
		out, err := f.clevisDecrypt(jwe)
		require.NoError(t, err)
		require.Equal(t, string(pt.Expose()), string(out))
	}
	theirs := time.Since(start)/time.Duration(n) - flush

	fmt.Printf("BENCH %s luksext_ms=%.1f\n", name, ms(ours))
	fmt.Printf("BENCH %s clevis_decrypt_ms=%.1f\n", name, ms(theirs))
	fmt.Printf("BENCH %s ratio_clevis_over_luksext=%.1f iterations=%d\n", name, float64(theirs)/float64(ours), n)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

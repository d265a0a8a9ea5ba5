package clevis_test

import (
	"fmt"
	"testing"
)

// sss nests: clevis writes and reads nested sss JWEs, and so must we, both
// ways. The outer t=2 (the TPM and an inner 2-of-2 Tang policy) makes sure
// the inner policy is really decrypted, not skipped.
func TestInteropNestedSSS(t *testing.T) {
	f := newFixture(t, true)
	tang := fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp)
	f.bothWays("sss", fmt.Sprintf(`{"t":2,"pins":{"tpm2":{"pcr_bank":"sha256","pcr_ids":"7"},"sss":{"t":2,"pins":{"tang":[%s,%s]}}}}`, tang, tang))
}

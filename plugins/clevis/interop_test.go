package clevis_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/clevis/tangtest"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/tpm/tpmtest"
)

// fixture is one test's TPM and (optionally) Tang server, with helpers
// to run the real clevis against the same TPM.
type fixture struct {
	t     *testing.T
	sw    *tpmtest.SWTPM
	tang  *tangtest.Server
	c     *clevis.Client
	tools map[string]string
}

func newFixture(t *testing.T, withTang bool) *fixture {
	t.Helper()
	f := &fixture{t: t, tools: testenv.Tools(t, "clevis", "clevis-encrypt-tpm2", "tpm2_createprimary", "tpm2_pcrextend", "tpm2_flushcontext")}
	f.sw = tpmtest.Start(t)
	if withTang {
		f.tang = tangtest.Start(t)
	}
	log := logrus.New()
	log.SetOutput(os.Stderr)
	f.c = clevis.New(f.sw.Spec, log)
	return f
}

func (f *fixture) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	f.t.Cleanup(cancel)
	return ctx
}

func (f *fixture) clevis(stdin []byte, args ...string) ([]byte, error) {
	f.t.Helper()
	cmd := exec.Command(f.tools["clevis"], args...)
	cmd.Env = append(os.Environ(), f.sw.Env()...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	// clevis 19's tpm2 pin leaks sessions on a TPM without resource
	// manager; clean up so the next call has room.
	f.sw.FlushAll(f.t)
	if err != nil {
		return out, fmt.Errorf("clevis %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

func (f *fixture) clevisEncrypt(pin, cfg string, pt []byte) string {
	f.t.Helper()
	out, err := f.clevis(pt, "encrypt", pin, cfg)
	require.NoError(f.t, err)
	return string(out)
}

func (f *fixture) clevisDecrypt(jwe string) ([]byte, error) {
	f.t.Helper()
	return f.clevis([]byte(jwe), "decrypt")
}

func (f *fixture) config(pin, cfg string) clevis.Config {
	f.t.Helper()
	c, err := clevis.ParseConfig(pin, []byte(cfg))
	require.NoError(f.t, err)
	return c
}

func (f *fixture) extendPCR(pcr int) {
	f.t.Helper()
	cmd := exec.Command(f.tools["tpm2_pcrextend"], fmt.Sprintf("%d:sha256=%s", pcr, strings.Repeat("ab", 32)))
	cmd.Env = append(os.Environ(), f.sw.Env()...)
	out, err := cmd.CombinedOutput()
	require.NoError(f.t, err, "%s", out)
}

// A LUKS-passphrase-like plaintext, fresh per test.
func newPlaintext(t *testing.T) secret.Bytes {
	t.Helper()
	p, err := secret.RandomHex(27)
	require.NoError(t, err)
	return p
}

// bothWays checks that clevis decrypts what we encrypt under cfg and that
// we decrypt what clevis encrypts under the same cfg.
// encryptBoth seals pt under one tpm2 policy twice: with our Encrypt and
// with stock clevis, so a test can hold both to the same expectation.
func (f *fixture) encryptBoth(t *testing.T, cfg string, pt secret.Bytes) (ours, theirs string) {
	t.Helper()
	ours, err := f.c.Encrypt(f.ctx(), f.config("tpm2", cfg), pt)
	require.NoError(t, err)
	return ours, f.clevisEncrypt("tpm2", cfg, pt.Expose())
}

// sssTPMTang seals pt to sss(t=threshold) of {the TPM, the fixture's Tang}.
func (f *fixture) sssTPMTang(t *testing.T, threshold int, pt secret.Bytes) string {
	t.Helper()
	cfg := fmt.Sprintf(`{"t":%d,"pins":{"tpm2":{},"tang":{"url":%q,"thp":%q}}}`, threshold, f.tang.URL, f.tang.Thp)
	jwe, err := f.c.Encrypt(f.ctx(), f.config("sss", cfg), pt)
	require.NoError(t, err)
	return jwe
}

func (f *fixture) bothWays(pin, cfg string) {
	f.t.Helper()
	pt := newPlaintext(f.t)

	ours, err := f.c.Encrypt(f.ctx(), f.config(pin, cfg), pt)
	require.NoError(f.t, err)
	name, err := clevis.PinName(ours)
	require.NoError(f.t, err)
	assert.Equal(f.t, pin, name)
	got, err := f.clevisDecrypt(ours)
	require.NoError(f.t, err, "clevis decrypt of our JWE")
	assert.Equal(f.t, string(pt.Expose()), string(got), "clevis decrypt of our JWE")

	theirs := f.clevisEncrypt(pin, cfg, pt.Expose())
	dec, err := f.c.Decrypt(f.ctx(), theirs)
	require.NoError(f.t, err, "our decrypt of clevis' JWE")
	assert.True(f.t, pt.Equal(dec), "our decrypt of clevis' JWE")
	dec.Wipe()
}

func TestInteropTPM2NoPCR(t *testing.T) {
	newFixture(t, false).bothWays("tpm2", `{}`)
}

func TestInteropTPM2PCR7(t *testing.T) {
	newFixture(t, false).bothWays("tpm2", `{"pcr_bank":"sha256","pcr_ids":"7"}`)
}

func TestInteropTang(t *testing.T) {
	f := newFixture(t, true)
	f.bothWays("tang", fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp))
}

func TestInteropSSS(t *testing.T) {
	for _, threshold := range []int{1, 2} {
		t.Run(fmt.Sprintf("t=%d", threshold), func(t *testing.T) {
			f := newFixture(t, true)
			f.bothWays("sss", fmt.Sprintf(`{"t":%d,"pins":{"tpm2":{"pcr_bank":"sha256","pcr_ids":"7"},"tang":[{"url":%q,"thp":%q}]}}`,
				threshold, f.tang.URL, f.tang.Thp))
		})
	}
}

// After sealing to PCR 7, a PCR 7 extend must make both our JWE and
// clevis' JWE fail with the policy-mismatch kind, and a restart of the TPM
// (a reboot into the same state) must make them work again: the failure
// is the policy, not damaged data.
func TestTPM2PCRExtendIsPolicyMismatch(t *testing.T) {
	f := newFixture(t, false)
	const cfg = `{"pcr_bank":"sha256","pcr_ids":"7"}`
	pt := newPlaintext(t)
	ours, theirs := f.encryptBoth(t, cfg, pt)

	f.extendPCR(7)
	for name, jwe := range map[string]string{"ours": ours, "clevis'": theirs} {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.Error(t, err, name)
		assert.True(t, got.IsEmpty(), name)
		assert.ErrorIs(t, err, clevis.ErrPCRMismatch, name)
		assert.Contains(t, err.Error(), "PCR 7 (sha256) changed since the key was sealed", name)
	}
	_, err := f.clevisDecrypt(ours)
	assert.Error(t, err, "clevis must refuse too")

	// A PCR not in the policy does not matter.
	f.sw.Restart(t)
	f.c.TPM = f.sw.Spec
	f.extendPCR(8)
	for _, jwe := range []string{ours, theirs} {
		got, err := f.c.Decrypt(f.ctx(), jwe)
		require.NoError(t, err)
		assert.True(t, pt.Equal(got))
	}
}

// A disk moved to another host meets another TPM: the sealed key must be
// refused with the wrong-TPM kind, never turn into some other plaintext.
func TestTPM2OtherTPMRefuses(t *testing.T) {
	for name, cfg := range map[string]string{"no PCR": `{}`, "PCR 7": `{"pcr_bank":"sha256","pcr_ids":"7"}`} {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t, false)
			pt := newPlaintext(t)
			ours, theirs := f.encryptBoth(t, cfg, pt)

			other := tpmtest.Start(t)
			c2 := clevis.New(other.Spec, nil)
			for _, jwe := range []string{ours, theirs} {
				got, err := c2.Decrypt(f.ctx(), jwe)
				require.Error(t, err)
				assert.True(t, got.IsEmpty())
				assert.ErrorIs(t, err, clevis.ErrWrongTPM)
			}
		})
	}
}

func TestTangUnreachableAndRotated(t *testing.T) {
	f := newFixture(t, true)
	pt := newPlaintext(t)
	jwe, err := f.c.Encrypt(f.ctx(), f.config("tang", fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp)), pt)
	require.NoError(t, err)

	f.tang.Stop()
	_, err = f.c.Decrypt(f.ctx(), jwe)
	assert.ErrorIs(t, err, clevis.ErrTangUnreachable)
	assert.Contains(t, err.Error(), f.tang.URL)

	f.tang.ReplaceKeys(t)
	f.tang.Restart(t)
	_, err = f.c.Decrypt(f.ctx(), jwe)
	assert.ErrorIs(t, err, clevis.ErrTangKeyUnknown)
}

func TestTangTrustIsExplicit(t *testing.T) {
	f := newFixture(t, true)
	other := tangtest.Start(t)
	pt := newPlaintext(t)

	// The thumbprint of another server's key: refused, nothing encrypted.
	cfg := f.config("tang", fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, other.Thp))
	jwe, err := f.c.Encrypt(f.ctx(), cfg, pt)
	assert.ErrorIs(t, err, clevis.ErrThumbprintMismatch)
	assert.Empty(t, jwe)

	// No thumbprint and no explicit trust: refused before any network use.
	_, err = clevis.ParseConfig("tang", []byte(fmt.Sprintf(`{"url":%q}`, f.tang.URL)))
	assert.ErrorIs(t, err, clevis.ErrInvalidConfig)
	_, err = f.c.Encrypt(f.ctx(), clevis.Config{Pin: "tang", Tang: &clevis.TangConfig{URL: f.tang.URL}}, pt)
	assert.ErrorIs(t, err, clevis.ErrInvalidConfig)

	// Explicit trust works, and clevis can decrypt the result.
	jwe, err = f.c.Encrypt(f.ctx(), f.config("tang", fmt.Sprintf(`{"url":%q,"trust":true}`, f.tang.URL)), pt)
	require.NoError(t, err)
	got, err := f.clevisDecrypt(jwe)
	require.NoError(t, err)
	assert.Equal(t, string(pt.Expose()), string(got))
}

// With Tang down, t=2 of {tpm2, tang} must fail and say which pin failed
// and why; t=1 must still unlock through the TPM.
func TestSSSWithTangDown(t *testing.T) {
	f := newFixture(t, true)
	pt := newPlaintext(t)
	t1, t2 := f.sssTPMTang(t, 1, pt), f.sssTPMTang(t, 2, pt)
	f.tang.Stop()

	_, err := f.c.Decrypt(f.ctx(), t2)
	require.Error(t, err)
	assert.ErrorIs(t, err, clevis.ErrThresholdNotMet)
	assert.ErrorIs(t, err, clevis.ErrTangUnreachable)
	var te *clevis.ThresholdError
	require.ErrorAs(t, err, &te)
	assert.Equal(t, 2, te.Need)
	assert.Equal(t, 1, te.Got)
	require.Len(t, te.Failures, 1)
	assert.Equal(t, "tang", te.Failures[0].Pin)
	assert.Contains(t, err.Error(), f.tang.URL)
	assert.Contains(t, err.Error(), "1 of the 2 required pins")

	got, err := f.c.Decrypt(f.ctx(), t1)
	require.NoError(t, err)
	assert.True(t, pt.Equal(got))
}

// The sealed object we create must be the one tpm2_create makes for
// clevis: same type, name algorithm, attributes (0x4D2 / 0x492), scheme
// and, for the same PCR values, the same authPolicy. Only the unique field
// (a hash of the random seed) may differ.
func TestTPM2SealedObjectMatchesClevis(t *testing.T) {
	for name, cfg := range map[string]string{"no PCR": `{}`, "PCR 0,7": `{"pcr_bank":"sha256","pcr_ids":"0,7"}`} {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t, false)
			pt := newPlaintext(t)
			ours, theirs := f.encryptBoth(t, cfg, pt)
			a, b := tpm2Header(t, ours), tpm2Header(t, theirs)
			assert.Equal(t, b["hash"], a["hash"])
			assert.Equal(t, b["key"], a["key"])
			assert.Equal(t, b["pcr_bank"], a["pcr_bank"])
			assert.Equal(t, b["pcr_ids"], a["pcr_ids"])
			pa, pb := decodeB64(t, a["jwk_pub"]), decodeB64(t, b["jwk_pub"])
			require.Equal(t, len(pb), len(pa))
			// TPM2B size(2) type(2) nameAlg(2) attrs(4) policy(2+n) scheme(2) unique(2+32)
			assert.Equal(t, fmt.Sprintf("%x", pb[:len(pb)-32]), fmt.Sprintf("%x", pa[:len(pa)-32]))
			assert.NotEqual(t, pb[len(pb)-32:], pa[len(pa)-32:])
		})
	}
}

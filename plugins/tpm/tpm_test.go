package tpm_test

import (
	"context"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/tpm"
	"github.com/luksext/luksext/plugins/tpm/tpmtest"
)

func TestParseSpec(t *testing.T) {
	for in, want := range map[string]tpm.Spec{
		"":                         {Kind: tpm.KindDevice},
		"device":                   {Kind: tpm.KindDevice},
		"device:/dev/tpm0":         {Kind: tpm.KindDevice, Path: "/dev/tpm0"},
		"swtpm:tcp:127.0.0.1:2321": {Kind: tpm.KindSWTPM, Addr: "127.0.0.1:2321"},
		"swtpm:tcp:[::1]:65535":    {Kind: tpm.KindSWTPM, Addr: "[::1]:65535"},
	} {
		got, err := tpm.ParseSpec(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
		again, err := tpm.ParseSpec(got.String())
		require.NoError(t, err)
		assert.Equal(t, got, again, "String must round-trip")
	}
	for _, bad := range []string{"tpm", "device:dev/tpm0", "swtpm:tcp:127.0.0.1", "swtpm:tcp::1", "swtpm:tcp:h:0", "swtpm:unix:/x"} {
		_, err := tpm.ParseSpec(bad)
		assert.ErrorIs(t, err, tpm.ErrBadSpec, bad)
	}
}

func TestAbsentDevice(t *testing.T) {
	_, err := tpm.Spec{Kind: tpm.KindDevice, Path: t.TempDir() + "/tpmrm0"}.Open(context.Background())
	assert.ErrorIs(t, err, tpm.ErrAbsent)
	assert.Contains(t, err.Error(), "tpmrm0")
}

func TestClassify(t *testing.T) {
	cases := []struct {
		rc   error
		kind error
	}{
		{tpm2.TPMRCLockout, tpm.ErrLockout},
		{tpm2.TPMRCPolicyFail + 0x900, tpm.ErrPolicyMismatch}, // 0x99D, as clevis reports it
		{tpm2.TPMRCAuthUnavailable, tpm.ErrPolicyMismatch},
		{tpm2.TPMRCIntegrity + 0x140, tpm.ErrWrongTPM}, // "parameter 1", as Load reports it
		{tpm2.TPMRCBadAuth, tpm.ErrOwnerAuth},
		{tpm2.TPMRCRetry, tpm.ErrBusy},
	}
	for _, c := range cases {
		got := tpm.Classify(c.rc)
		assert.ErrorIs(t, got, c.kind, "%v", c.rc)
		assert.ErrorIs(t, got, c.rc, "original code must stay in the chain")
	}
	plain := errors.New("x")
	assert.Same(t, plain, tpm.Classify(plain))
	assert.NoError(t, tpm.Classify(nil))
}

func TestRetryStopsOnPermanentAndBoundsTransient(t *testing.T) {
	ctx := context.Background()
	calls := 0
	err := tpm.Retry(ctx, func() error { calls++; return tpm2.TPMRCPCRChanged })
	assert.ErrorIs(t, err, tpm.ErrBusy)
	assert.Equal(t, tpm.RetryAttempts, calls)

	calls = 0
	err = tpm.Retry(ctx, func() error {
		calls++
		if calls < 3 {
			return tpm2.TPMRCYielded
		}
		return nil
	})
	assert.NoError(t, err)
	assert.Equal(t, 3, calls)

	calls = 0
	err = tpm.Retry(ctx, func() error { calls++; return tpm2.TPMRCPolicyFail })
	assert.ErrorIs(t, err, tpm2.TPMRCPolicyFail)
	assert.Equal(t, 1, calls)
}

// The swtpm transport must carry real commands, and survive a restart of
// the TPM on the same state (what a host reboot looks like).
func TestSWTPMTransport(t *testing.T) {
	sw := tpmtest.Start(t)
	for round := 0; round < 2; round++ {
		tp := sw.Open(t)
		rsp, err := tpm2.GetRandom{BytesRequested: 16}.Execute(tp)
		require.NoError(t, err)
		assert.Len(t, rsp.RandomBytes.Buffer, 16)
		require.NoError(t, tp.Close())
		if round == 0 {
			sw.Restart(t)
		}
	}
}

package clevis_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"sync/atomic"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/tpm"
)

// racingOpener hands out TPM connections that extend PCR 8 right after
// each PolicyPCR command, as a boot component measuring itself during an
// unlock would (clevis issue #151). PCR 8 is not in the policy, but any
// extend moves the TPM's PCR update counter, so the next Unseal in that
// session answers TPM_RC_PCR_CHANGED.
type racingOpener struct {
	inner   tpm.Opener
	races   atomic.Int32 // extends still to inject
	unseals atomic.Int32 // Unseal commands seen
}

func (o *racingOpener) Open(ctx context.Context) (transport.TPMCloser, error) {
	t, err := o.inner.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &racingTPM{TPMCloser: t, o: o}, nil
}

type racingTPM struct {
	transport.TPMCloser
	o *racingOpener
}

func (r *racingTPM) Send(cmd []byte) ([]byte, error) {
	rsp, err := r.TPMCloser.Send(cmd)
	if err != nil || len(cmd) < 10 {
		return rsp, err
	}
	switch tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) {
	case tpm2.TPMCCUnseal:
		r.o.unseals.Add(1)
	case tpm2.TPMCCPolicyPCR:
		if r.o.races.Add(-1) >= 0 {
			_, xerr := tpm2.PCRExtend{
				PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(8), Auth: tpm2.PasswordAuth(nil)},
				Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
					HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{0xcd}, 32),
				}}},
			}.Execute(r.TPMCloser)
			if xerr != nil {
				return nil, xerr
			}
		}
	}
	return rsp, err
}

// A PCR extend between PolicyPCR and Unseal is retried (a bounded number
// of times) and then succeeds; a TPM whose PCRs never settle gives up with
// the busy kind instead of looping, and never with a policy mismatch.
func TestTPM2UnsealRetriesPCRChanged(t *testing.T) {
	f := newFixture(t, false)
	pt := newPlaintext(t)
	const cfg = `{"pcr_bank":"sha256","pcr_ids":"7"}`
	jwes := []string{f.clevisEncrypt("tpm2", cfg, pt.Expose())}
	ours, err := f.c.Encrypt(f.ctx(), f.config("tpm2", cfg), pt)
	require.NoError(t, err)
	jwes = append(jwes, ours)

	for _, jwe := range jwes {
		racer := &racingOpener{inner: f.sw.Spec}
		racer.races.Store(1)
		got, err := clevis.New(racer, nil).Decrypt(f.ctx(), jwe)
		require.NoError(t, err)
		assert.True(t, pt.Equal(got))
		assert.Equal(t, int32(2), racer.unseals.Load(), "one Unseal hit PCR_CHANGED, the retry succeeded")

		racer = &racingOpener{inner: f.sw.Spec}
		racer.races.Store(1 << 20)
		_, err = clevis.New(racer, nil).Decrypt(f.ctx(), jwe)
		require.Error(t, err)
		assert.ErrorIs(t, err, clevis.ErrTPMBusy)
		assert.ErrorIs(t, err, tpm2.TPMRCPCRChanged)
		assert.NotErrorIs(t, err, clevis.ErrPCRMismatch)
		assert.Equal(t, int32(tpm.RetryAttempts), racer.unseals.Load())
	}
}

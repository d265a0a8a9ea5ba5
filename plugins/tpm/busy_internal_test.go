package tpm

import (
	"context"
	"errors"
	"io/fs"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type nopTPM struct{}

func (nopTPM) Send([]byte) ([]byte, error) { return nil, nil }
func (nopTPM) Close() error                { return nil }

func busyErr() error {
	return &fs.PathError{Op: "open", Path: "/dev/tpm0", Err: syscall.EBUSY}
}

// A /dev/tpm0 held by another process answers EBUSY: Open must wait for it
// (bounded), not report "no TPM" or fail an unlock that would succeed a
// moment later.
func TestWaitWhileBusy(t *testing.T) {
	ctx := context.Background()
	calls := 0
	tp, err := waitWhileBusy(ctx, 5*time.Second, func() (transport.TPMCloser, error) {
		calls++
		if calls < 3 {
			return nil, busyErr()
		}
		return nopTPM{}, nil
	})
	require.NoError(t, err)
	assert.NotNil(t, tp)
	assert.Equal(t, 3, calls)

	// Bounded: a device that stays busy gives ErrBusy after maxWait.
	start := time.Now()
	_, err = waitWhileBusy(ctx, 150*time.Millisecond, func() (transport.TPMCloser, error) { return nil, busyErr() })
	assert.ErrorIs(t, err, ErrBusy)
	assert.Less(t, time.Since(start), 2*time.Second)

	// Other errors are returned at once.
	calls = 0
	_, err = waitWhileBusy(ctx, 5*time.Second, func() (transport.TPMCloser, error) { calls++; return nil, fs.ErrPermission })
	assert.ErrorIs(t, err, fs.ErrPermission)
	assert.Equal(t, 1, calls)

	// A cancelled context ends the wait.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = waitWhileBusy(cctx, 5*time.Second, func() (transport.TPMCloser, error) { return nil, busyErr() })
	assert.True(t, errors.Is(err, context.Canceled))
}

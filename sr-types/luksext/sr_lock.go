package luksext

import (
	"context"
	"errors"
	"path/filepath"

	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/smapi"
)

// lockSR serialises the SR-level operations of one SR across processes
// (xapi-storage-script runs calls concurrently, and the operator command
// takes the same lock): an exclusive flock on <StateDir>/<sr_uuid>.lock,
// waited for until the call's deadline.
func (s *srService) lockSR(ctx context.Context, srUUID string) (func(), error) {
	path := filepath.Join(s.StateDir, srUUID+".lock")
	l, err := lock.Acquire(ctx, path, lock.Exclusive, smapi.Logger(ctx))
	if errors.Is(err, lock.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return nil, smapi.Errorf(smapi.KindInUse, "another operation on SR %s is still running (lock %s)", srUUID, path)
	}
	if err != nil {
		return nil, err
	}
	return func() { _ = l.Release() }, nil
}

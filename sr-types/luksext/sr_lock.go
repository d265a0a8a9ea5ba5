package luksext

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/luksext/luksext/plugins/smapi"
)

// lockSR serialises the SR-level operations of one SR across processes
// (xapi-storage-script runs calls concurrently): an exclusive flock on
// <StateDir>/<sr_uuid>.lock, polled until ctx ends.
func (s *srService) lockSR(ctx context.Context, srUUID string) (func(), error) {
	if err := os.MkdirAll(s.StateDir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(s.StateDir, srUUID+".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock %s: %w", path, err)
	}
	start := time.Now()
	warned := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if err != syscall.EWOULDBLOCK {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if !warned && time.Since(start) > time.Second {
			smapi.Logger(ctx).WithField("lock", path).Warn("waiting for another operation on this SR")
			warned = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, smapi.Errorf(smapi.KindInUse, "another operation on SR %s is still running (lock %s)", srUUID, path)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

package luksext

import (
	"context"
	"path/filepath"

	"github.com/luksext/luksext/plugins/lock"
)

// lockSR serialises the SR-level operations of one SR across processes
// (xapi-storage-script runs calls concurrently, and the operator command
// takes the same lock): an exclusive flock on <StateDir>/<sr_uuid>.lock,
// waited for until the call's deadline. Volume.* calls hold the same file
// shared (SRCheck.open), so SR.detach waits for them and they never run
// on an SR that is being unmounted.
func (s *srService) lockSR(ctx context.Context, srUUID string) (func(), error) {
	l, err := acquireSRLock(ctx, s.StateDir, srUUID, lock.Exclusive, 0)
	if err != nil {
		return nil, err
	}
	return func() { _ = l.Release() }, nil
}

// check is the SRCheck of this service's paths.
func (s *srService) check() SRCheck {
	c := SRCheck{MountRoot: s.MountRoot, StateDir: s.StateDir, MapperDir: "/dev/mapper"}
	if s.FS != nil {
		c.MountInfo = s.FS.MountInfo
	}
	if s.LUKS != nil {
		c.MapperDir = filepath.Dir(s.LUKS.MapperPath("x"))
	}
	return c
}

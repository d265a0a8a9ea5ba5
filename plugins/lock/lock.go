// Package lock is flock(2)-based locking between processes. Every SMAPIv3
// call is a fresh process and xapi-storage-script runs calls in parallel,
// so locks must be files. A lock held by a process that dies (kill -9)
// is released by the kernel, so a crash never leaves a stale lock.
package lock

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Mode is shared (readers) or exclusive (writers).
type Mode int

// Modes.
const (
	Shared Mode = iota
	Exclusive
)

func (m Mode) String() string {
	if m == Shared {
		return "shared"
	}
	return "exclusive"
}

// ErrTimeout: the lock could not be taken before the context ended.
var ErrTimeout = errors.New("timed out waiting for a lock")

// SlowWait is how long a wait may take before it is logged as a warning
// (the XCP-ng libcow habit: slow locks are the first thing to look for).
const SlowWait = time.Second

// Lock is a held lock.
type Lock struct {
	f    *os.File
	path string
	then []func()
}

// OnRelease runs f after the lock is released (a lock that guards a
// call's use of another lock releases both together).
func (l *Lock) OnRelease(f func()) { l.then = append(l.then, f) }

// Acquire takes the lock on path (creating the file, not its directory),
// polling until ctx ends. A context without deadline waits forever,
// which a plugin must never do: give it one.
func Acquire(ctx context.Context, path string, mode Mode, log logrus.FieldLogger) (*Lock, error) {
	start := time.Now()
	warned := false
	delay := time.Millisecond
	for {
		l, ok, err := TryAcquire(path, mode)
		if err != nil {
			return nil, err
		}
		if ok {
			if waited := time.Since(start); waited > SlowWait && log != nil {
				log.WithFields(logrus.Fields{"lock": path, "mode": mode.String(), "waited_ms": waited.Milliseconds()}).Warn("lock was slow to acquire")
			}
			return l, nil
		}
		if !warned && time.Since(start) > SlowWait && log != nil {
			log.WithFields(logrus.Fields{"lock": path, "mode": mode.String()}).Warn("waiting for a lock held by another operation")
			warned = true
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%s lock %s: %w (another operation on this SR holds it: %v)", mode, path, ErrTimeout, ctx.Err())
		case <-time.After(delay):
		}
		if delay < 50*time.Millisecond {
			delay *= 2
		}
	}
}

// TryAcquire takes the lock if it is free; ok is false when it is held.
func TryAcquire(path string, mode Mode) (l *Lock, ok bool, err error) {
	// The file is created, never its directory: a lock under an SR whose
	// filesystem was just unmounted must fail, not recreate the SR's tree
	// (and then the caller's files) unencrypted on the host's /run. The
	// caller makes the directory once it has proved where it is.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, false, fmt.Errorf("opening lock file: %w", err)
	}
	err = tryFlock(f, mode)
	if err == syscall.EWOULDBLOCK {
		f.Close()
		return nil, false, nil
	}
	if err != nil {
		f.Close()
		return nil, false, fmt.Errorf("locking %s: %w", path, err)
	}
	return &Lock{f: f, path: path}, true, nil
}

// Release drops the lock. Safe on nil.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the only descriptor releases the flock
	l.f = nil
	for i := len(l.then) - 1; i >= 0; i-- {
		l.then[i]()
	}
	l.then = nil
	return err
}

// Held reports whether another process (or descriptor) holds path in a
// way that excludes mode. Used to see whether a daemon is alive. It is a
// question, so it creates nothing: a lock file that does not exist is not
// held (and asking about an SR that is no longer mounted must not recreate
// directories under its mountpoint).
func Held(path string, mode Mode) (bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("opening lock file: %w", err)
	}
	defer f.Close()
	err = tryFlock(f, mode)
	if err == syscall.EWOULDBLOCK {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("locking %s: %w", path, err)
	}
	return false, nil // closing f drops the probe lock
}

// tryFlock takes a non-blocking flock in mode; EWOULDBLOCK means another
// holder excludes it.
func tryFlock(f *os.File, mode Mode) error {
	how := syscall.LOCK_SH
	if mode == Exclusive {
		how = syscall.LOCK_EX
	}
	return Flock(int(f.Fd()), how|syscall.LOCK_NB)
}

// Flock is flock(2) on fd, retried when a signal interrupts it. For
// callers that lock a file they also read and write through the same
// descriptor (Acquire's files are lock files only).
func Flock(fd, how int) error {
	for {
		err := syscall.Flock(fd, how)
		if err != syscall.EINTR {
			return err
		}
	}
}

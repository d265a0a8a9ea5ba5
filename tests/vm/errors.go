package vm

import "errors"

// Error kinds a caller can act on with errors.Is.
var (
	// ErrUnavailable: this machine cannot run the VM tier (missing QEMU,
	// kernel, busybox-static or swtpm, or not root). Tests skip (or, in
	// strict CI mode, fail) with the reason.
	ErrUnavailable = errors.New("VM tier unavailable")
	// ErrBoot: the guest did not reach its agent (see the console tail).
	ErrBoot = errors.New("guest did not boot")
	// ErrTimeout: a guest command ran past its deadline.
	ErrTimeout = errors.New("guest command timed out")
	// ErrGuestStopped: the guest powered off or crashed while in use.
	ErrGuestStopped = errors.New("guest stopped")
)

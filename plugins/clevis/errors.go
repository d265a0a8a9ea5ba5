package clevis

import (
	"errors"
	"fmt"
	"strings"

	"github.com/luksext/luksext/plugins/clevis/jose"
	"github.com/luksext/luksext/plugins/tpm"
)

// Error kinds. Every error from Encrypt and Decrypt wraps one of these (or
// a context error); test with errors.Is. The TPM kinds are the same values
// as plugins/tpm's, so either package's sentinel matches.
var (
	// ErrTPMAbsent: this host has no usable TPM 2.0.
	ErrTPMAbsent = tpm.ErrAbsent
	// ErrTPMLockout: dictionary-attack lockout; retrying makes it worse.
	ErrTPMLockout = tpm.ErrLockout
	// ErrPCRMismatch: the boot measurements changed since sealing (firmware,
	// Secure Boot or bootloader update). Unlock another way and re-bind.
	ErrPCRMismatch = tpm.ErrPolicyMismatch
	// ErrWrongTPM: the key was sealed by another TPM (disk moved), or this
	// TPM was cleared.
	ErrWrongTPM = tpm.ErrWrongTPM
	// ErrTPMOwnerAuth: the TPM owner hierarchy has a password, which the
	// clevis format cannot carry. Remove it, or unlock another way.
	ErrTPMOwnerAuth = tpm.ErrOwnerAuth
	// ErrTPMBusy: the TPM kept answering "retry" (or another process held
	// /dev/tpm0) beyond the bounded wait. Transient: try again later.
	ErrTPMBusy = tpm.ErrBusy
	// ErrTangUnreachable: the Tang server did not answer (network, DNS,
	// server down, timeout).
	//lint:ignore ST1005 "Tang" is the name of the server software, capitalised as its project does
	ErrTangUnreachable = errors.New("Tang server unreachable")
	// ErrTangKeyUnknown: the server answered but no longer has the key this
	// data was bound to (keys rotated and the old ones deleted).
	//lint:ignore ST1005 "Tang" is the name of the server software, capitalised as its project does
	ErrTangKeyUnknown = errors.New("Tang server no longer has the key this data was bound to")
	// ErrThumbprintMismatch: the Tang server's signing keys are not the
	// trusted ones (wrong server, or keys replaced).
	//lint:ignore ST1005 "Tang" is the name of the server software, capitalised as its project does
	ErrThumbprintMismatch = errors.New("Tang advertisement is not signed by the trusted key (thumbprint mismatch)")
	// ErrMalformed: the JWE (or a Tang reply) is not what clevis writes.
	ErrMalformed = jose.ErrMalformed
	// ErrDecrypt: the JWE did not authenticate under the recovered key.
	ErrDecrypt = jose.ErrDecrypt
	// ErrUnsupportedPin: a pin this implementation does not handle.
	ErrUnsupportedPin = errors.New("unsupported clevis pin")
	// ErrThresholdNotMet: an sss policy got fewer shares than its threshold.
	ErrThresholdNotMet = errors.New("not enough clevis pins could be unlocked")
	// ErrInvalidConfig: a pin configuration is rejected before any work.
	ErrInvalidConfig = errors.New("invalid clevis configuration")
)

// PinFailure is why one child of an sss policy could not be decrypted.
type PinFailure struct {
	Index int    // position in the sss "jwe" array
	Pin   string // pin name, or "" when the child JWE did not parse
	Where string // human hint: Tang URL, "tpm2 PCR 7 (sha256)", ...
	Err   error
}

// ThresholdError reports an sss policy that did not reach its threshold,
// with the reason for each child that failed. It matches
// ErrThresholdNotMet and, through Unwrap, every child's error kind.
type ThresholdError struct {
	Need, Got int
	Failures  []PinFailure
}

func (e *ThresholdError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sss: %d of the %d required pins unlocked", e.Got, e.Need)
	for _, f := range e.Failures {
		name := f.Pin
		if name == "" {
			name = "?"
		}
		fmt.Fprintf(&b, "; pin %d (%s", f.Index+1, name)
		if f.Where != "" {
			fmt.Fprintf(&b, " %s", f.Where)
		}
		fmt.Fprintf(&b, "): %v", f.Err)
	}
	return b.String()
}

// Is makes errors.Is(err, ErrThresholdNotMet) true.
func (e *ThresholdError) Is(target error) bool { return target == ErrThresholdNotMet }

// Unwrap exposes the children's errors to errors.Is/As.
func (e *ThresholdError) Unwrap() []error {
	out := make([]error, 0, len(e.Failures))
	for _, f := range e.Failures {
		out = append(out, f.Err)
	}
	return out
}

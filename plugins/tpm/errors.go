package tpm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// Error kinds. Classify wraps TPM errors with one of these so callers can
// use errors.Is without knowing TPM response codes.
var (
	// ErrAbsent: no TPM device (or the configured swtpm is not listening).
	ErrAbsent = errors.New("no TPM 2.0 found: check that the host has a TPM enabled in firmware and that /dev/tpmrm0 exists")
	// ErrLockout: the TPM's dictionary-attack protection is active.
	ErrLockout = errors.New("the TPM is in dictionary-attack lockout: wait for the lockout to expire or clear it with the lockout authorization")
	// ErrPolicyMismatch: the sealed object's policy (PCR values) is not met.
	ErrPolicyMismatch = errors.New("the TPM refused to unseal: the measured boot state (PCR values) differs from when the key was sealed")
	// ErrWrongTPM: the sealed blob cannot be loaded by this TPM: it was made
	// by another TPM, or this TPM was cleared since.
	ErrWrongTPM = errors.New("the sealed key does not belong to this TPM (the disk was moved to another host, or the TPM was cleared)")
	// ErrOwnerAuth: the owner hierarchy has a password, which clevis cannot supply.
	ErrOwnerAuth = errors.New("the TPM owner hierarchy is protected by a password, which clevis-style sealing does not support")
	// ErrBusy: the TPM kept asking to retry.
	ErrBusy = errors.New("the TPM stayed busy after several retries")
	// ErrBadSpec: the TPM selection string is malformed.
	ErrBadSpec = errors.New("malformed TPM selection")
)

// Classify wraps err with the kind that matches its TPM response code. The
// original error stays in the chain (for logs and errors.As); errors that
// are not TPM response codes, or are already classified, pass through.
func Classify(err error) error {
	if err == nil {
		return nil
	}
	for _, k := range []error{ErrAbsent, ErrLockout, ErrPolicyMismatch, ErrWrongTPM, ErrOwnerAuth, ErrBusy} {
		if errors.Is(err, k) {
			return err
		}
	}
	var kind error
	switch {
	case errors.Is(err, tpm2.TPMRCLockout):
		kind = ErrLockout
	case errors.Is(err, tpm2.TPMRCPolicyFail), errors.Is(err, tpm2.TPMRCPolicy),
		errors.Is(err, tpm2.TPMRCPCR), errors.Is(err, tpm2.TPMRCAuthUnavailable):
		// AUTH_UNAVAILABLE is what a PCR-bound object (no userWithAuth)
		// answers to password auth: again "the policy was not satisfied".
		kind = ErrPolicyMismatch
	case errors.Is(err, tpm2.TPMRCIntegrity):
		kind = ErrWrongTPM
	case errors.Is(err, tpm2.TPMRCBadAuth), errors.Is(err, tpm2.TPMRCAuthFail):
		kind = ErrOwnerAuth
	case isTransient(err):
		kind = ErrBusy
	default:
		return err
	}
	return fmt.Errorf("%w: %w", kind, err)
}

func isTransient(err error) bool {
	return errors.Is(err, tpm2.TPMRCRetry) || errors.Is(err, tpm2.TPMRCYielded) ||
		errors.Is(err, tpm2.TPMRCTesting) || errors.Is(err, tpm2.TPMRCPCRChanged) ||
		errors.Is(err, tpm2.TPMRCNVRate)
}

// RetryAttempts bounds Retry. PCR_CHANGED only repeats while something
// keeps extending PCRs (early boot); a handful of tries rides that out.
const RetryAttempts = 5

// Retry runs op again while it fails with a transient TPM code (RETRY,
// YIELDED, TESTING, NV_RATE, PCR_CHANGED), up to RetryAttempts times with a
// short growing pause. op must be self-contained (open its own sessions),
// because PCR_CHANGED invalidates the policy session it ran in.
func Retry(ctx context.Context, op func() error) error {
	var err error
	for i := 0; i < RetryAttempts; i++ {
		if err = op(); err == nil || !isTransient(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ctx.Err(), err)
		case <-time.After(time.Duration(20<<i) * time.Millisecond):
		}
	}
	return fmt.Errorf("%w: %w", ErrBusy, err)
}

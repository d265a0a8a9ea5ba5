package luksext

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
)

// LUKS metadata states: SR.create writes "creating" right after the
// header exists and "ready" as its last step, so a rerun after a crash
// knows a half-made SR of its own (safe to redo) from a finished one.
const (
	stateCreating = "creating"
	stateReady    = "ready"
	// stateAdopting: luksext adopt has begun turning an SMAPIv1 SR into
	// this one and has not finished (sr_adopt.go); attach refuses it.
	stateAdopting = "adopting"
)

// create turns a blank disk into an encrypted SR. Steps: validate →
// refuse non-blank → LUKS header (TPM keyslot) → clevis binding → recovery
// keyslot → unlock through the binding (proves it works) → ext4 → SR record
// → close. Rerun after a crash: a header of ours still "creating" is
// redone from scratch (it holds no data yet); "ready" returns the result.
func (s *srService) create(ctx context.Context, p smapi.SRCreateParams) (map[string]string, error) {
	log := smapi.Logger(ctx).WithField("sr_uuid", p.UUID)
	if !validUUID(p.UUID) {
		return nil, smapi.Errorf(smapi.KindInvalidParameters, "SR uuid %q is not a uuid", p.UUID)
	}
	plan, err := parseCreateConfig(p.Configuration, s.DevDir)
	if err != nil {
		return nil, err
	}
	unlock, err := s.lockSR(ctx, p.UUID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	dev := plan.Stable
	log = log.WithField("dev", dev)

	redo := false
	if info, err := s.LUKS.Inspect(dev); err == nil && info.SRUUID() != "" {
		md, ok, _ := s.LUKS.ReadMetadata(dev)
		switch {
		case info.SRUUID() != p.UUID:
			return nil, smapi.Errorf(smapi.KindDeviceNotBlank, "%s already holds the luksext SR %s; destroy that SR first (xe sr-destroy), or set device-config:force=true to erase it", plan.Device, info.SRUUID())
		case ok && md.State == stateAdopting:
			// never "redo" (reformat) an SR half-way through luksext adopt
			return nil, smapi.Errorf(smapi.KindDeviceNotBlank, "%s holds SR %s, whose adoption from SMAPIv1 did not finish; run 'luksext adopt %s' again", plan.Device, p.UUID, plan.Device)
		case ok && md.State == stateReady:
			log.Info("SR already created on this device; returning its configuration")
			return plan.resultConfig(p.UUID, info.UUID), nil
		default:
			log.Warn("found an unfinished SR.create of this SR; starting it again")
			redo = true
		}
	}
	if !redo {
		if _, err := s.Probe.CheckUnused(ctx, dev, plan.Force); err != nil {
			return nil, smapi.Wrap(smapi.KindDeviceNotBlank, err)
		}
	}
	// A half-made SR may still be mapped or mounted by the crashed run.
	name := luks.SRName(p.UUID)
	if err := s.FS.Unmount(ctx, s.createMountpoint(p.UUID)); err != nil {
		return nil, err
	}
	if err := s.LUKS.Close(ctx, name); err != nil {
		return nil, err
	}
	// force erases data, never a disk in use: refuse while the kernel
	// says the device is mounted or held, before anything is written.
	if err := blockdev.CheckExclusive(dev); err != nil {
		return nil, err
	}

	recovery, err := s.recoveryPassphrase(ctx, plan.Recovery)
	if err != nil {
		return nil, err
	}
	defer recovery.Wipe()

	luksUUID := store.NewID()
	tpmPass, err := luks.NewKeyslotPassphrase()
	if err != nil {
		return nil, err
	}
	defer tpmPass.Wipe()

	// Seal first: a TPM that refuses must fail the call before the disk
	// is touched.
	jwe, err := s.Keys.Encrypt(ctx, plan.Policy, tpmPass)
	if err != nil {
		return nil, fmt.Errorf("sealing the disk key (%s): %w", describePolicy(plan), err)
	}
	step := func(what string) *logrus.Entry { return log.WithField("step", what) }

	step("format").Info("writing the LUKS header")
	if _, err := s.LUKS.Format(ctx, dev, luks.FormatOptions{
		UUID: luksUUID, Label: name, Passphrase: tpmPass, Keyslot: 0, KDF: luks.MinimalKDF(), Force: true,
	}); err != nil {
		return nil, fmt.Errorf("formatting %s as LUKS: %w", dev, err)
	}
	if err := s.LUKS.WriteMetadata(ctx, dev, luks.Metadata{SRUUID: p.UUID, State: stateCreating}); err != nil {
		return nil, err
	}
	step("bind").Info("storing the clevis binding")
	if err := s.LUKS.Bind(ctx, dev, 0, jwe); err != nil {
		return nil, fmt.Errorf("storing the key binding on %s: %w", dev, err)
	}
	if !recovery.IsEmpty() {
		step("recovery").Info("adding the recovery keyslot")
		if _, err := s.LUKS.AddKeyslot(ctx, dev, tpmPass, recovery, -1, luks.RecoveryKDF()); err != nil {
			return nil, fmt.Errorf("adding the recovery keyslot: %w", err)
		}
	}

	step("verify").Info("unlocking once through the binding")
	if err := s.unlockDevice(ctx, dev, name, nil); err != nil {
		return nil, fmt.Errorf("the new binding does not unlock the disk: %w", err)
	}
	defer func() { _ = s.LUKS.Close(context.WithoutCancel(ctx), name) }()

	step("mkfs").Info("creating the ext4 filesystem")
	mapper := s.LUKS.MapperPath(name)
	if err := s.FS.Mkfs(ctx, mapper); err != nil {
		return nil, err
	}
	mnt := s.createMountpoint(p.UUID)
	if err := s.FS.Mount(ctx, mapper, mnt); err != nil {
		return nil, err
	}
	meta := SRMeta{UUID: p.UUID, Name: p.Name, Description: p.Description, LUKSUUID: luksUUID, Device: plan.Stable}
	werr := writeSRMeta(mnt, meta)
	if err := s.FS.Unmount(ctx, mnt); err != nil {
		return nil, err
	}
	if werr != nil {
		return nil, werr
	}
	if err := s.LUKS.Close(ctx, name); err != nil {
		return nil, err
	}
	if err := s.LUKS.WriteMetadata(ctx, dev, luks.Metadata{SRUUID: p.UUID, State: stateReady}); err != nil {
		return nil, err
	}

	// The recovery passphrase now lives in a keyslot; unless the
	// administrator asked for automatic fallback, xapi must not keep it.
	if plan.Recovery.SecretUUID != "" && !plan.Fallback {
		if err := s.Secrets.DestroySecret(ctx, plan.Recovery.SecretUUID); err != nil {
			log.WithError(err).Warn("could not remove the recovery passphrase from xapi; remove it with xe secret-destroy")
		}
	}
	log.WithField("luks_uuid", luksUUID).Info("SR created")
	return plan.resultConfig(p.UUID, luksUUID), nil
}

func (s *srService) createMountpoint(srUUID string) string {
	return filepath.Join(s.StateDir, "create-"+srUUID)
}

// recoveryPassphrase resolves the recovery passphrase, if one was given.
func (s *srService) recoveryPassphrase(ctx context.Context, r recoverySource) (secret.Bytes, error) {
	switch {
	case r.Plain != "":
		return secret.FromString(r.Plain), nil
	case r.SecretUUID != "":
		v, err := s.Secrets.SecretValue(ctx, r.SecretUUID)
		if err != nil {
			return secret.Bytes{}, fmt.Errorf("reading the recovery passphrase from xapi (secret %s): %w", r.SecretUUID, err)
		}
		if v.Len() < 8 {
			v.Wipe()
			return secret.Bytes{}, invalid(KeyRecoveryPassword, "must be at least 8 characters long")
		}
		return v, nil
	}
	return secret.Bytes{}, nil
}

func describePolicy(p createPlan) string {
	d := "tpm2"
	if len(p.PCRIDs) > 0 {
		d += fmt.Sprintf(" with PCR %s (%s)", p.PCRIDs, p.PCRBank)
	}
	if len(p.Tang) > 0 {
		d = fmt.Sprintf("sss %d of {%s, %d tang}", p.SSS, d, len(p.Tang))
	}
	return d
}

var errNoBinding = errors.New("the device has no clevis binding")

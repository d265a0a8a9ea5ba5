package luksext

import (
	"context"

	"github.com/luksext/luksext/plugins/luks"
)

// Host is the SR type's view of this host that the operator command
// (package operator) works through: the same dependencies, device lookup,
// mountpoints and SR lock as SR.attach, so the command and xapi never
// disagree about which disk is an SR's, and never race each other.
type Host struct {
	SRDeps
	s *srService
}

// NewHost fills in the host's defaults (/var/run/sr-mount, /dev, ...).
func NewHost(d SRDeps) *Host {
	d = d.withDefaults()
	return &Host{SRDeps: d, s: &srService{d}}
}

// Mountpoint is where SR.attach mounts the SR.
func (h *Host) Mountpoint(srUUID string) string { return h.s.mountpoint(srUUID) }

// FindDevice finds an SR's disk from its device-config (device, luks-uuid)
// as SR.attach does.
func (h *Host) FindDevice(cfg map[string]string) (string, error) { return h.s.findDevice(cfg) }

// LockSR takes the SR's lock that every SR.* call takes; the returned
// function releases it.
func (h *Host) LockSR(ctx context.Context, srUUID string) (func(), error) {
	return h.s.lockSR(ctx, srUUID)
}

// CandidateDisks lists the disks SR.probe would look at.
func (h *Host) CandidateDisks() []string { return h.s.candidateDisks() }

// MarkAutoUnlockBroken records that the SR cannot unlock by itself any
// more (SR.stat's reason, and a XAPI message the first time).
func (h *Host) MarkAutoUnlockBroken(ctx context.Context, srUUID, reason string) {
	h.s.markAutoUnlockBroken(ctx, srUUID, reason)
}

// MarkAutoUnlockWorking clears that record once every binding unseals.
func (h *Host) MarkAutoUnlockWorking(ctx context.Context, srUUID string) {
	h.s.markAutoUnlockWorking(ctx, srUUID)
}

// StablePath is the /dev/disk/by-id name of dev that SR.create stores.
func StablePath(dev, devDir string) string { return stablePath(dev, devDir) }

// ReadSRMeta reads the SR record of a mounted SR directory.
func ReadSRMeta(sr string) (SRMeta, error) { return readSRMeta(sr) }

// DescribeBinding names a keyslot's binding for people ("keyslot 1 (tpm2)").
func DescribeBinding(b luks.Binding) string { return describeBinding(b) }

// ValidUUID accepts an SR uuid in either case, as xe and people type it.
func ValidUUID(s string) bool { return validUUID(s) }

// StateReady is the luksext metadata state of a finished SR.create.
const StateReady = stateReady

// StateAdopting is the luksext metadata state of an unfinished adopt.
const StateAdopting = stateAdopting

package operator

import (
	"context"
	"fmt"
	"github.com/luksext/luksext/sr-types/luksext"
	"os"
	"path/filepath"
	"strings"
)

// statusReport is `luksext status`.
type statusReport struct {
	SRs []srStatus `json:"srs"`
}

type srStatus struct {
	SRUUID      string `json:"sr_uuid,omitempty"`
	Device      string `json:"device"`
	LUKSUUID    string `json:"luks_uuid"`
	LUKSVersion int    `json:"luks_version"`
	// State is SR.create's progress marker ("ready"), "" on a disk bound
	// by hand.
	State string `json:"state,omitempty"`
	// Layout is what sits on the mapping: omitted for ext4 directly,
	// "lvm" for an SR adopted from SMAPIv1 (luksext adopt).
	Layout     string       `json:"layout,omitempty"`
	Mapping    string       `json:"mapping"`
	Unlocked   bool         `json:"unlocked"`
	Mountpoint string       `json:"mountpoint,omitempty"`
	Mounted    bool         `json:"mounted"`
	Keyslots   []slotStatus `json:"keyslots"`
	// RecoveryPassphrase: at least one keyslot without binding, i.e. a
	// passphrase a person typed (it cannot be checked without it).
	RecoveryPassphrase bool `json:"recovery_passphrase"`
	// UnlocksAutomatically: some binding unseals and opens its keyslot
	// now, so SR.attach will work with nobody present.
	UnlocksAutomatically bool        `json:"unlocks_automatically"`
	InterruptedChange    *keyJournal `json:"interrupted_change,omitempty"`
}

type slotStatus struct {
	Keyslot int         `json:"keyslot"`
	KDF     string      `json:"kdf"`
	Kind    string      `json:"kind"` // "binding" or "passphrase"
	Policy  *policyView `json:"policy,omitempty"`
	// Unseals is the dry run's verdict for a binding; absent for a
	// passphrase.
	Unseals *bool  `json:"unseals,omitempty"`
	Error   string `json:"error,omitempty"`
}

func (r statusReport) allUnlockAutomatically() bool {
	for _, s := range r.SRs {
		if !s.UnlocksAutomatically {
			return false
		}
	}
	return true
}

func (r statusReport) Text() string {
	if len(r.SRs) == 0 {
		return "No luksext SR disk found on this host.\n"
	}
	var b strings.Builder
	for i, s := range r.SRs {
		if i > 0 {
			b.WriteString("\n")
		}
		name := "LUKS device (not a luksext SR)"
		if s.SRUUID != "" {
			name = "SR " + s.SRUUID
		}
		fmt.Fprintf(&b, "%s\n  device:   %s (LUKS%d, uuid %s)\n", name, s.Device, s.LUKSVersion, s.LUKSUUID)
		switch {
		case s.State == luksext.StateAdopting:
			fmt.Fprintf(&b, "  state:    %s (luksext adopt did not finish: run it again)\n", s.State)
		case s.State != "" && s.State != luksext.StateReady:
			fmt.Fprintf(&b, "  state:    %s (SR.create did not finish)\n", s.State)
		}
		if s.Layout == luksext.LayoutLVM {
			fmt.Fprintf(&b, "  layout:   lvm (volume group %s, adopted from SMAPIv1)\n", luksext.VGName(s.SRUUID))
		}
		fmt.Fprintf(&b, "  unlocked: %s (/dev/mapper/%s)\n", yesNo(s.Unlocked), s.Mapping)
		if s.Mountpoint != "" {
			fmt.Fprintf(&b, "  mounted:  %s (%s)\n", yesNo(s.Mounted), s.Mountpoint)
		}
		for _, k := range s.Keyslots {
			switch {
			case k.Kind == "passphrase":
				fmt.Fprintf(&b, "  keyslot %-2d recovery passphrase (%s)\n", k.Keyslot, k.KDF)
			case k.Unseals != nil && *k.Unseals:
				fmt.Fprintf(&b, "  keyslot %-2d %s: unseals now\n", k.Keyslot, k.Policy)
			default:
				fmt.Fprintf(&b, "  keyslot %-2d %s: does NOT unseal: %s\n", k.Keyslot, k.Policy, k.Error)
			}
		}
		if s.InterruptedChange != nil {
			fmt.Fprintf(&b, "  an interrupted '%s' is pending: the next key-changing luksext command finishes or undoes it\n", s.InterruptedChange.Op)
		}
		target := s.SRUUID
		if target == "" {
			target = s.Device
		}
		switch {
		case s.UnlocksAutomatically:
			b.WriteString("  automatic unlock: yes\n")
		case s.RecoveryPassphrase:
			fmt.Fprintf(&b, "  automatic unlock: NO. Run 'luksext unlock %s' (recovery passphrase), plug the SR (xe pbd-plug), then 'luksext rebind %s SLOT' for the binding above\n", target, target)
		default:
			b.WriteString("  automatic unlock: NO, and there is no recovery passphrase: restore the TPM/Tang state the key was sealed to, or a header backup\n")
		}
	}
	return b.String()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (a *admin) status(ctx context.Context) (report, error) {
	var targets []target
	if len(a.opts.Args) == 1 {
		t, err := a.resolve(a.opts.Args[0])
		if err != nil {
			return nil, err
		}
		targets = append(targets, t)
	} else {
		targets = a.allSRs()
	}
	r := statusReport{SRs: []srStatus{}}
	for _, t := range targets {
		s := a.statusOf(ctx, t)
		a.recordAutoUnlock(ctx, s)
		r.SRs = append(r.SRs, s)
	}
	return r, nil
}

// recordAutoUnlock turns a status into the SR's health record (luksext.Host):
// degraded while a binding does not unseal, healthy once all do. Run by
// `luksext status` and after `luksext rebind`.
func (a *admin) recordAutoUnlock(ctx context.Context, s srStatus) {
	if !luksext.ValidUUID(s.SRUUID) || (s.State != "" && s.State != luksext.StateReady) {
		return
	}
	var broken []string
	for _, k := range s.Keyslots {
		if k.Kind == "binding" && (k.Unseals == nil || !*k.Unseals) {
			broken = append(broken, fmt.Sprintf("keyslot %d %s: %s", k.Keyslot, k.Policy, k.Error))
		}
	}
	switch {
	case len(broken) > 0:
		a.MarkAutoUnlockBroken(ctx, s.SRUUID, "has key bindings that no longer unseal ("+strings.Join(broken, "; ")+")")
	case s.UnlocksAutomatically:
		a.MarkAutoUnlockWorking(ctx, s.SRUUID)
	default:
		a.MarkAutoUnlockBroken(ctx, s.SRUUID, "has no key binding: only the recovery passphrase opens it")
	}
}

// allSRs finds luksext SR disks: every disk whose LUKS header names an SR
// (as SR.probe does), plus the disks of SRs mounted under MountRoot.
func (a *admin) allSRs() []target {
	seen := map[string]bool{}
	var out []target
	add := func(dev string) {
		info, err := a.LUKS.Inspect(dev)
		if err != nil || info.SRUUID() == "" || seen[info.UUID] {
			return
		}
		seen[info.UUID] = true
		out = append(out, newTarget(dev, luksext.StablePath(dev, a.DevDir), info))
	}
	for _, dev := range a.CandidateDisks() {
		add(dev)
	}
	entries, _ := os.ReadDir(a.MountRoot)
	for _, e := range entries {
		if m, err := luksext.ReadSRMeta(filepath.Join(a.MountRoot, e.Name())); err == nil {
			if dev, err := a.FindDevice(map[string]string{luksext.KeyDevice: m.Device, luksext.KeyLUKSUUID: m.LUKSUUID}); err == nil {
				add(dev)
			}
		}
	}
	return out
}

func (a *admin) statusOf(ctx context.Context, t target) srStatus {
	s := srStatus{SRUUID: t.SRUUID, Device: t.Dev, LUKSUUID: t.Info.UUID, LUKSVersion: t.Info.Version, Mapping: t.Name, Keyslots: []slotStatus{}}
	if t.Info.Metadata != nil {
		s.State, s.Layout = t.Info.Metadata.State, t.Info.Metadata.Layout
	}
	s.Unlocked = a.LUKS.IsOpen(t.Name)
	if t.SRUUID != "" {
		s.Mountpoint = a.Mountpoint(t.SRUUID)
		_, s.Mounted, _ = a.FS.MountedAt(s.Mountpoint)
	}
	probes := map[int]probe{}
	for _, p := range a.probeBindings(ctx, t) {
		probes[p.Binding.Keyslot] = p
	}
	for _, k := range t.Info.Keyslots {
		ks := slotStatus{Keyslot: k.ID, KDF: k.KDF, Kind: "passphrase"}
		if p, ok := probes[k.ID]; ok {
			pol := p.Policy
			ok := p.Err == nil
			ks.Kind, ks.Policy, ks.Unseals = "binding", &pol, &ok
			if p.Err != nil {
				ks.Error = p.Err.Error()
			}
			s.UnlocksAutomatically = s.UnlocksAutomatically || ok
		} else {
			s.RecoveryPassphrase = true
		}
		s.Keyslots = append(s.Keyslots, ks)
	}
	if j, ok, err := a.readJournal(t); err == nil && ok {
		s.InterruptedChange = &j
	}
	return s
}

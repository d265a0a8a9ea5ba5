package luksext

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/luksext/luksext/plugins/smapi"
)

// probe answers `xe sr-probe-ext type=luksext [device-config:device=...]`:
// luksext SRs found on the given device (or on every disk of the host),
// with the complete configuration needed to re-introduce them after a host
// reinstall, and blank disks that SR.create would accept. It changes
// nothing and needs no key.
func (s *srService) probe(ctx context.Context, p smapi.SRProbeParams) ([]smapi.ProbeResult, error) {
	devices := []string{}
	if d := p.Configuration[KeyDevice]; d != "" {
		st, err := os.Stat(d)
		if err != nil {
			return nil, smapi.Errorf(smapi.KindDeviceNotFound, "device-config:device %s does not exist on this host", d)
		}
		// Only a block device can hold an SR: a regular file, a directory
		// or /dev/null is never "blank: SR.create will use it".
		if !isBlockDevice(st.Mode()) {
			return nil, invalid(KeyDevice, "%s is not a block device", d)
		}
		devices = append(devices, d)
	} else {
		devices = s.candidateDisks()
	}
	results := []smapi.ProbeResult{}
	for _, dev := range devices {
		stable := stablePath(dev, s.DevDir)
		info, err := s.LUKS.Inspect(dev)
		if err == nil && info.SRUUID() != "" {
			srUUID := info.SRUUID()
			cfg := map[string]string{KeyDevice: stable, KeySRUUID: srUUID, KeyLUKSUUID: info.UUID}
			stat := smapi.SRStat{SR: stable, Name: "luksext SR " + srUUID, UUID: &srUUID, Datasources: []string{}, Health: smapi.Healthy()}
			extra := map[string]string{"luks_version": strconv.Itoa(info.Version), "bindings": strconv.Itoa(len(info.Bindings))}
			if md, ok, _ := s.LUKS.ReadMetadata(dev); ok && md.State == stateAdopting {
				stat.Health = smapi.Unavailable("luksext adopt did not finish on this device; run it again")
			} else if ok && md.State != stateReady {
				stat.Health = smapi.Unavailable("SR.create did not finish on this device")
			}
			if m, err := readSRMeta(s.mountpoint(srUUID)); err == nil && m.UUID == srUUID {
				stat.Name, stat.Description = m.Name, m.Description
				extra["attached"] = "true"
			}
			results = append(results, smapi.ProbeResult{Configuration: cfg, Complete: true, SR: &stat, ExtraInfo: extra})
			continue
		}
		sigs, perr := s.Probe.CheckUnused(ctx, dev, true)
		if perr != nil {
			continue
		}
		extra := map[string]string{}
		if len(sigs) == 0 {
			extra["status"] = "blank: SR.create will use it"
		} else {
			var what []string
			for _, sg := range sigs {
				what = append(what, sg.Describe())
			}
			extra["status"] = "holds " + strings.Join(what, ", ") + ": SR.create needs force=true and erases it"
		}
		results = append(results, smapi.ProbeResult{Configuration: map[string]string{KeyDevice: stable}, Complete: false, ExtraInfo: extra})
	}
	return results, nil
}

// candidateDisks lists whole disks and partitions that could hold an SR:
// no device-mapper, loop, ram, zram, nbd, optical, floppy or tapdisk devices (md RAID arrays are fine).
func (s *srService) candidateDisks() []string {
	entries, err := os.ReadDir("/sys/class/block")
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		skip := false
		for _, p := range []string{"dm-", "loop", "ram", "zram", "nbd", "sr", "fd", "tapdev", "td"} {
			skip = skip || strings.HasPrefix(n, p)
		}
		if skip {
			continue
		}
		dev := filepath.Join(s.DevDir, n)
		if st, err := os.Stat(dev); err == nil && isBlockDevice(st.Mode()) {
			out = append(out, dev)
		}
	}
	sort.Strings(out)
	return out
}

func isBlockDevice(m os.FileMode) bool { return m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0 }

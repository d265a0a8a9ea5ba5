package luksext

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/smapi"
)

// secretSuffix is what xapi appends to device-config keys ending in
// "password": it stores the value as a Secret and passes its uuid.
const secretSuffix = "_secret"

// createPlan is a validated SR.create device-config. Everything is checked
// here, before any byte is written to a disk.
type createPlan struct {
	Device   string // as given
	Stable   string // /dev/disk/by-id/... when one exists
	Force    bool
	Policy   clevis.Config
	PCRIDs   clevis.PCRList
	PCRBank  string
	Tang     []clevis.TangConfig
	SSS      int
	Recovery recoverySource
	Fallback bool
}

// recoverySource is where the recovery passphrase comes from: a xapi
// Secret uuid (the normal path) or, when the plugin is driven directly
// (sm-cli, tests), the plain key.
type recoverySource struct {
	SecretUUID string
	Plain      string
}

func (r recoverySource) present() bool { return r.SecretUUID != "" || r.Plain != "" }

func invalid(key, format string, args ...any) error {
	return smapi.Errorf(smapi.KindInvalidConfiguration, "device-config:%s %s", key, fmt.Sprintf(format, args...))
}

// parseCreateConfig validates cfg against the schema in config.go.
func parseCreateConfig(cfg map[string]string, devDir string) (createPlan, error) {
	var p createPlan
	known := map[string]bool{}
	for _, k := range ConfigKeys {
		known[k.Name] = true
	}
	known[KeyRecoveryPassword+secretSuffix] = true
	var unknown []string
	for k := range cfg {
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return p, smapi.Errorf(smapi.KindInvalidConfiguration, "unknown device-config key(s) %s; known keys: see xe sm-list type=%s params=configuration", strings.Join(unknown, ", "), PluginName)
	}

	p.Device = strings.TrimSpace(cfg[KeyDevice])
	if p.Device == "" {
		return p, invalid(KeyDevice, "is required, e.g. device-config:device=/dev/sdb")
	}
	if !strings.HasPrefix(p.Device, "/") {
		return p, invalid(KeyDevice, "must be an absolute path such as /dev/sdb, not %q", p.Device)
	}
	st, err := os.Stat(p.Device)
	if err != nil {
		return p, smapi.Errorf(smapi.KindDeviceNotFound, "device-config:device %s does not exist on this host (check the name with lsblk)", p.Device)
	}
	if st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0 {
		return p, invalid(KeyDevice, "%s is not a block device", p.Device)
	}
	p.Stable = stablePath(p.Device, devDir)

	var berr error
	if p.Force, berr = parseBool(cfg, KeyForce); berr != nil {
		return p, berr
	}
	if p.Fallback, berr = parseBool(cfg, KeyRecoveryFallback); berr != nil {
		return p, berr
	}
	p.Recovery = recoverySource{SecretUUID: cfg[KeyRecoveryPassword+secretSuffix], Plain: cfg[KeyRecoveryPassword]}
	if p.Fallback && !p.Recovery.present() {
		return p, invalid(KeyRecoveryFallback, "needs a recovery-password to fall back to")
	}
	if p.Recovery.Plain != "" && len(p.Recovery.Plain) < 8 {
		return p, invalid(KeyRecoveryPassword, "must be at least 8 characters long")
	}

	tpm2 := clevis.TPM2Config{}
	if ids := strings.TrimSpace(cfg[KeyTPM2PCRIDs]); ids != "" {
		for _, s := range strings.Split(ids, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || n < 0 || n > 23 {
				return p, invalid(KeyTPM2PCRIDs, "must be a comma-separated list of PCR numbers 0-23, got %q", ids)
			}
			p.PCRIDs = append(p.PCRIDs, n)
		}
		p.PCRBank = "sha256"
	}
	if bank := strings.TrimSpace(cfg[KeyTPM2PCRBank]); bank != "" {
		if bank != "sha256" && bank != "sha1" {
			return p, invalid(KeyTPM2PCRBank, "must be sha256 or sha1, got %q", bank)
		}
		if len(p.PCRIDs) == 0 {
			return p, invalid(KeyTPM2PCRBank, "only makes sense with tpm2-pcr-ids")
		}
		p.PCRBank = bank
	}
	tpm2.PCRIDs, tpm2.PCRBank = p.PCRIDs, p.PCRBank
	tpmPin := clevis.Config{Pin: clevis.PinTPM2, TPM2: &tpm2}

	urls := splitList(cfg[KeyTangURL])
	thps := splitList(cfg[KeyTangThp])
	trust, berr := parseBool(cfg, KeyTangTrust)
	if berr != nil {
		return p, berr
	}
	if len(thps) > 0 && len(thps) != len(urls) {
		return p, invalid(KeyTangThp, "has %d thumbprint(s) for %d tang-url(s); give one per server, in the same order", len(thps), len(urls))
	}
	if len(urls) > 0 && len(thps) == 0 && !trust {
		return p, invalid(KeyTangThp, "is required with tang-url (run tang-show-keys on each server), or set tang-trust=true to accept the servers' keys unverified")
	}
	for i, u := range urls {
		pu, err := url.Parse(u)
		if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			return p, invalid(KeyTangURL, "%q is not an http(s) URL", u)
		}
		tc := clevis.TangConfig{URL: u, Trust: trust && len(thps) == 0}
		if len(thps) > 0 {
			tc.Thp = thps[i]
		}
		p.Tang = append(p.Tang, tc)
	}

	p.SSS = 1
	if s := strings.TrimSpace(cfg[KeySSSThreshold]); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1+len(p.Tang) {
			return p, invalid(KeySSSThreshold, "must be a number from 1 to %d (the TPM plus %d Tang server(s)), got %q", 1+len(p.Tang), len(p.Tang), s)
		}
		p.SSS = n
	}

	p.Policy = tpmPin
	if len(p.Tang) > 0 {
		pins := []clevis.Config{tpmPin}
		for i := range p.Tang {
			tc := p.Tang[i]
			pins = append(pins, clevis.Config{Pin: clevis.PinTang, Tang: &tc})
		}
		p.Policy = clevis.Config{Pin: clevis.PinSSS, SSS: &clevis.SSSConfig{T: p.SSS, Pins: pins}}
	}
	if err := p.Policy.Validate(); err != nil {
		return p, smapi.Errorf(smapi.KindInvalidConfiguration, "key policy rejected: %v", err)
	}
	return p, nil
}

// resultConfig is what SR.create returns: it REPLACES the PBD's
// device-config, so it carries everything SR.attach needs and no secret
// (the recovery Secret's uuid only when the administrator opted in to the
// automatic fallback).
func (p createPlan) resultConfig(srUUID, luksUUID string) map[string]string {
	out := map[string]string{
		KeyDevice:   p.Stable,
		KeySRUUID:   srUUID,
		KeyLUKSUUID: luksUUID,
	}
	if len(p.PCRIDs) > 0 {
		out[KeyTPM2PCRIDs], out[KeyTPM2PCRBank] = p.PCRIDs.String(), p.PCRBank
	}
	if len(p.Tang) > 0 {
		var urls, thps []string
		for _, t := range p.Tang {
			urls = append(urls, t.URL)
			if t.Thp != "" {
				thps = append(thps, t.Thp)
			}
		}
		out[KeyTangURL] = strings.Join(urls, ",")
		if len(thps) > 0 {
			out[KeyTangThp] = strings.Join(thps, ",")
		}
		out[KeySSSThreshold] = strconv.Itoa(p.SSS)
	}
	if p.Fallback && p.Recovery.SecretUUID != "" {
		out[KeyRecoveryFallback] = "true"
		out[KeyRecoveryPassword+secretSuffix] = p.Recovery.SecretUUID
	}
	return out
}

func parseBool(cfg map[string]string, key string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(cfg[key])) {
	case "", "false", "no", "0", "off":
		return false, nil
	case "true", "yes", "1", "on":
		return true, nil
	}
	return false, invalid(key, "must be true or false, got %q", cfg[key])
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// stablePath returns a /dev/disk/by-id link to the same device when one
// exists: /dev/sdX names can change between boots, by-id names cannot.
// wwn- links are the last choice (several disks can share a WWN behind
// some controllers).
func stablePath(dev, devDir string) string {
	if strings.HasPrefix(dev, filepath.Join(devDir, "disk", "by-id")+"/") {
		return dev
	}
	target, err := filepath.EvalSymlinks(dev)
	if err != nil {
		return dev
	}
	entries, err := os.ReadDir(filepath.Join(devDir, "disk", "by-id"))
	if err != nil {
		return dev
	}
	var best string
	for _, e := range entries {
		link := filepath.Join(devDir, "disk", "by-id", e.Name())
		if t, err := filepath.EvalSymlinks(link); err != nil || t != target {
			continue
		}
		if best == "" || (strings.HasPrefix(filepath.Base(best), "wwn-") && !strings.HasPrefix(e.Name(), "wwn-")) {
			best = link
		}
	}
	if best == "" {
		return dev
	}
	return best
}

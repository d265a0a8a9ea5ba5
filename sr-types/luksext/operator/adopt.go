package operator

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/adopt"
)

// adoptReport is `luksext adopt`.
type adoptReport struct {
	SRUUID       string            `json:"sr_uuid"`
	Device       string            `json:"device"`
	LUKSUUID     string            `json:"luks_uuid"`
	Layout       string            `json:"layout"`
	Changed      bool              `json:"changed"`
	Volumes      []adopt.Node      `json:"volumes"`
	NamesUnused  []string          `json:"names_unused"`
	DeviceConfig map[string]string `json:"device_config"`
	XE           []string          `json:"xe"`
	AuthorisedBy string            `json:"authorised_by,omitempty"`
	Message      string            `json:"message"`
}

func (r adoptReport) Text() string {
	var b strings.Builder
	b.WriteString(r.Message + "\n")
	if len(r.Volumes) > 0 {
		b.WriteString("\nVolumes (key = VDI uuid):\n")
		for _, v := range r.Volumes {
			kind := fmt.Sprintf("VDI %q", v.Name)
			if v.Hidden {
				kind = "base copy (internal node)"
			}
			parent := ""
			if v.Parent != "" {
				parent = ", parent " + v.Parent
			}
			fmt.Fprintf(&b, "  %s  %s, %d bytes%s\n", v.ID, kind, v.VirtualSize, parent)
		}
	}
	if len(r.NamesUnused) > 0 {
		fmt.Fprintf(&b, "\n--names records for no VDI on this SR (ignored): %s\n", strings.Join(r.NamesUnused, ", "))
	}
	b.WriteString("\nBring the SR back (as root on this host):\n")
	for _, c := range r.XE {
		b.WriteString("  " + c + "\n")
	}
	return b.String()
}

// adopt takes over a hand-made SR (luksext.Host.Adopt does the work).
func (a *admin) adopt(ctx context.Context) (report, error) {
	arg := a.opts.Args[0]
	if !strings.HasPrefix(arg, "/") {
		return nil, usageErr("adopt takes the LUKS device's path (e.g. /dev/sdb), not %q", arg)
	}
	if a.opts.Names == "-" && a.opts.KeyFile == "-" {
		return nil, usageErr("--names and --key-file cannot both read stdin")
	}
	var names map[string]adopt.Names
	if a.opts.Names != "" {
		var err error
		if names, err = readNames(a.opts.Names, a); err != nil {
			return nil, err
		}
	}
	t, err := a.resolve(arg)
	if err != nil {
		return nil, err
	}
	done, err := a.AdoptPrecheck(t.Dev, t.Info)
	if err != nil {
		return nil, err
	}
	req := luksext.AdoptRequest{Device: t.Dev, Names: names, Crash: a.AdoptCrash, Keyslot: -1}
	authorised := ""
	if !done {
		pass, what, slot, err := a.authoriseSlot(ctx, t)
		if err != nil {
			return nil, err
		}
		defer pass.Wipe()
		req.Pass, req.Keyslot, authorised = pass, slot, what
	}
	res, err := a.Adopt(ctx, req)
	if err != nil {
		return nil, err
	}
	r := adoptReport{SRUUID: res.SRUUID, Device: res.Device, LUKSUUID: res.LUKSUUID, Layout: res.Layout, Changed: res.Changed,
		Volumes: res.Plan.Nodes, NamesUnused: res.Plan.NamesUnused, DeviceConfig: res.DeviceConfig, AuthorisedBy: authorised}
	if r.Volumes == nil {
		r.Volumes = []adopt.Node{}
	}
	if r.NamesUnused == nil {
		r.NamesUnused = []string{}
	}
	r.XE = xeSequence(res)
	vdis := 0
	for _, v := range r.Volumes {
		if !v.Hidden {
			vdis++
		}
	}
	if res.Changed {
		r.Message = fmt.Sprintf("SR %s on %s is now a luksext SR (layout lvm): %d VDI(s) and %d base copies recorded under their old uuids; its keyslots and clevis binding are unchanged.", res.SRUUID, res.Device, vdis, len(r.Volumes)-vdis)
	} else {
		r.Message = fmt.Sprintf("SR %s on %s was adopted already; nothing was changed.", res.SRUUID, res.Device)
	}
	return r, nil
}

// xeSequence is what brings the SR back into xapi (xe sr-introduce keeps
// the uuid; sr-scan then finds every VDI under its old uuid, since
// Volume.uuid = the key = the old uuid: xen-api xapi_sr.ml update_vdis).
func xeSequence(res luksext.AdoptResult) []string {
	keys := make([]string, 0, len(res.DeviceConfig))
	for k := range res.DeviceConfig {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var dc []string
	for _, k := range keys {
		dc = append(dc, fmt.Sprintf("device-config:%s=%s", k, res.DeviceConfig[k]))
	}
	return []string{
		fmt.Sprintf("xe sr-introduce uuid=%s type=%s content-type=user shared=false name-label=%q", res.SRUUID, luksext.PluginName, luksext.AdoptedName),
		fmt.Sprintf("PBD=$(xe pbd-create host-uuid=$(xe host-list hostname=$(hostname) --minimal) sr-uuid=%s %s)", res.SRUUID, strings.Join(dc, " ")),
		"xe pbd-plug uuid=$PBD",
		fmt.Sprintf("xe sr-scan uuid=%s", res.SRUUID),
	}
}

// readNames reads --names FILE ('-': stdin).
func readNames(path string, a *admin) (map[string]adopt.Names, error) {
	if path == "-" {
		return adopt.ParseNames(a.inv.Stdin)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, smapi.Errorf(smapi.KindInvalidParameters, "--names %s: %v", path, err)
	}
	defer f.Close()
	return adopt.ParseNames(f)
}

package luksext

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
)

const (
	vendor    = "luksext developers"
	copyright = "(C) luksext developers, GPLv2"
)

// VolumeFeatures are declared on top of what xapi-storage-script derives
// from the method files present (xen-api ocaml/xapi-storage-script/main.ml
// QueryImpl.query_impl adds SR_ATTACH for SR.attach, VDI_CREATE for
// Volume.create, ...; xapi drops names smint.ml does not know).
var VolumeFeatures = []string{"SR_PROBE", "SR_UPDATE", "VDI_CREATE", "VDI_DELETE", "VDI_UPDATE", "VDI_RESIZE", "VDI_SNAPSHOT", "VDI_CLONE", "VDI_ACTIVATE_READONLY", "THIN_PROVISIONING"}

// DatapathFeatures: none yet. NONPERSISTENT would make the daemon hand
// reset-on-boot disks to Datapath.open/close; without it the daemon uses
// Volume.clone, which our volumes support.
var DatapathFeatures = []string{}

// VolumeQuery is the volume plugin's Plugin.Query answer.
func VolumeQuery() smapi.QueryResult {
	return smapi.QueryResult{
		Plugin:               PluginName,
		Name:                 "LUKS-encrypted ext4 SR",
		Description:          "Local ext4 SR on a LUKS2 block device whose key is sealed to the host TPM 2.0 (clevis format), optionally to Tang servers, with a recovery passphrase",
		Vendor:               vendor,
		Copyright:            copyright,
		Version:              Version,
		RequiredAPIVersion:   APIVersion,
		Features:             append([]string{}, VolumeFeatures...),
		Configuration:        Configuration(),
		RequiredClusterStack: []string{},
	}
}

// DatapathQuery is the datapath plugin's Plugin.Query answer.
func DatapathQuery() smapi.QueryResult {
	q := VolumeQuery()
	q.Name = "luksext datapath (tapdisk)"
	q.Description = "Serves luksext volumes to VMs through tapdisk (vbd3)"
	q.Features = append([]string{}, DatapathFeatures...)
	q.Configuration = map[string]string{}
	return q
}

// diagnostics is a human-readable report with no secrets and no PII: the
// version, the tools we call and whether a TPM is visible.
func diagnostics(kind string, paths run.Paths, tools []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "luksext %s plugin %s (%s, %s/%s)\n", kind, Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	for _, t := range tools {
		if p, err := paths.Resolve(t); err == nil {
			fmt.Fprintf(&b, "tool %s: %s\n", t, p)
		} else {
			fmt.Fprintf(&b, "tool %s: MISSING\n", t)
		}
	}
	for _, dev := range []string{"/dev/tpmrm0", "/dev/tpm0"} {
		_, err := os.Stat(dev)
		fmt.Fprintf(&b, "%s: %v\n", dev, err == nil)
	}
	return b.String()
}

// Deps are the real or fake edges the handlers use. Each capability keeps
// its own dependencies in its own struct, defined beside its handlers.
type Deps struct {
	Paths    run.Paths
	SR       SRDeps
	Volumes  VolumeDeps
	Datapath DatapathDeps
}

// VolumeTable is the volume plugin's method table.
func VolumeTable(d Deps) smapi.Table {
	return smapi.VolumeIDL().With(append(append(srMethods(d), volumeMethods(d)...),
		smapi.Handle("Plugin.Query", smapi.ResultQuery, func(context.Context, smapi.DbgParams) (smapi.QueryResult, error) {
			return VolumeQuery(), nil
		}),
		smapi.Handle("Plugin.diagnostics", smapi.ResultString, func(context.Context, smapi.DbgParams) (string, error) {
			return diagnostics("volume", d.Paths, []string{"cryptsetup", "mkfs.ext4", "e2fsck", "blkid"}), nil
		}),
	)...)
}

// DatapathTable is the datapath plugin's method table.
func DatapathTable(d Deps) smapi.Table {
	return smapi.DatapathIDL().With(append(datapathMethods(d),
		smapi.Handle("Plugin.Query", smapi.ResultQuery, func(context.Context, smapi.DbgParams) (smapi.QueryResult, error) {
			return DatapathQuery(), nil
		}),
		smapi.Handle("Plugin.diagnostics", smapi.ResultString, func(context.Context, smapi.DbgParams) (string, error) {
			return diagnostics("datapath", d.Paths, []string{"tap-ctl"}), nil
		}),
	)...)
}

// Classify maps this SR type's domain errors to SMAPIv3 kinds. It is the
// one table of that mapping; smapi.ToRecord consults it.
func Classify(err error) (smapi.Kind, bool) {
	for _, c := range classifications {
		if errors.Is(err, c.target) {
			return c.kind, true
		}
	}
	return smapi.Kind{}, false
}

package smapitest

import (
	"encoding/json"

	"github.com/luksext/luksext/plugins/smapi"
)

// Datapath conformance: what xapi-storage-script and xenopsd rely on from
// any datapath plugin (xen-api ocaml/xapi-storage/generator/lib/data.ml,
// xapi-storage-script main.ml, xenopsd storage.ml): every call idempotent,
// use counted per domain, a XenDisk plus a dom0-usable path from attach,
// and a detach that never fails for something that is not attached.

// Domains the cases use: a guest domid and a dom0 datapath string as
// xapi-storage-script builds them ("u0-" + dp with '/' and '-' mapped to '_').
const (
	GuestDomain = "7"
	Dom0Domain  = "u0_vbd_0_xvdb_smapitest"
)

// DatapathVolumes tells the datapath cases how to get volumes.
type DatapathVolumes struct {
	// NewURI returns the URI of a fresh volume the plugin can serve; every
	// call must return a different volume.
	NewURI func(c *Ctx) string
	// CheckBackend, if set, inspects an attach result further (for
	// example: the device exists and reads the volume's content).
	CheckBackend func(c *Ctx, b smapi.Backend)
}

// DatapathCases are the Datapath lifecycle cases, for Config.Lifecycle.
func DatapathCases(v DatapathVolumes) []Case {
	return []Case{
		{"DatapathLifecycle", func(c *Ctx) { dpLifecycle(c, v) }},
		{"DatapathEveryCallIdempotent", func(c *Ctx) { dpIdempotent(c, v) }},
		{"DatapathTwoDomains", func(c *Ctx) { dpTwoDomains(c, v) }},
		{"DatapathUnknownURIIsAnError", dpUnknownURI},
		{"DatapathDetachOfNeverAttachedSucceeds", func(c *Ctx) { dpDetachNever(c, v) }},
	}
}

func dpParams(uri, domain string) map[string]any {
	return map[string]any{"dbg": "smapitest", "uri": uri, "domain": domain}
}

// attach calls Datapath.attach and checks what xenopsd needs: a XenDisk
// (mandatory for guest VBDs) and a BlockDevice or File path (the device
// xenopsd writes to xenstore, and what dom0 uses for import/export).
func dpAttach(c *Ctx, v DatapathVolumes, uri, domain string) smapi.Backend {
	c.T.Helper()
	var b smapi.Backend
	c.MustSucceed("Datapath.attach", dpParams(uri, domain), &b)
	var xen, path int
	for _, i := range b.Implementations {
		switch {
		case i.XenDisk != nil:
			xen++
			if i.XenDisk.BackendType == "" {
				c.T.Errorf("Datapath.attach: XenDisk without backend_type")
			}
		case i.BlockDevice != nil && i.BlockDevice.Path != "", i.File != nil && i.File.Path != "":
			path++
		}
	}
	if xen == 0 {
		c.T.Errorf("Datapath.attach returned no XenDisk: xenopsd fails 'Could not find XenDisk implementation'")
	}
	if path == 0 {
		c.T.Errorf("Datapath.attach returned no BlockDevice or File path: guest VBDs get empty params and dom0 cannot use the volume")
	}
	if v.CheckBackend != nil {
		v.CheckBackend(c, b)
	}
	return b
}

func dpMust(c *Ctx, method, uri, domain string) {
	c.T.Helper()
	c.MustSucceed(method, dpParams(uri, domain), nil)
}

func dpLifecycle(c *Ctx, v DatapathVolumes) {
	uri := v.NewURI(c)
	dpAttach(c, v, uri, GuestDomain)
	dpMust(c, "Datapath.activate", uri, GuestDomain)
	dpMust(c, "Datapath.deactivate", uri, GuestDomain)
	dpMust(c, "Datapath.detach", uri, GuestDomain)
	// Served again after a full cycle.
	dpAttach(c, v, uri, GuestDomain)
	dpMust(c, "Datapath.activate", uri, GuestDomain)
	dpMust(c, "Datapath.detach", uri, GuestDomain) // DP.destroy may skip deactivate
}

func dpIdempotent(c *Ctx, v DatapathVolumes) {
	uri := v.NewURI(c)
	first := dpAttach(c, v, uri, Dom0Domain)
	for i := 0; i < 2; i++ {
		again := dpAttach(c, v, uri, Dom0Domain)
		if !sameBackend(first, again) {
			c.T.Errorf("Datapath.attach repeated for the same domain returned a different backend:\n%s\n%s", js(first), js(again))
		}
	}
	for _, m := range []string{"Datapath.activate", "Datapath.deactivate", "Datapath.detach"} {
		for i := 0; i < 3; i++ {
			dpMust(c, m, uri, Dom0Domain)
		}
	}
}

func dpTwoDomains(c *Ctx, v DatapathVolumes) {
	uri := v.NewURI(c)
	dpAttach(c, v, uri, GuestDomain) // checks the backend's shape
	dpMust(c, "Datapath.activate", uri, GuestDomain)
	b := dpAttach(c, v, uri, Dom0Domain)
	dpMust(c, "Datapath.activate", uri, Dom0Domain)
	dpMust(c, "Datapath.deactivate", uri, GuestDomain)
	dpMust(c, "Datapath.detach", uri, GuestDomain)
	// The other domain still holds the volume: attaching it again must
	// give the very same backend, not a new one.
	b2 := dpAttach(c, v, uri, Dom0Domain)
	if !sameBackend(b, b2) {
		c.T.Errorf("after the first domain detached, the second domain's backend changed:\n%s\n%s", js(b), js(b2))
	}
	dpMust(c, "Datapath.deactivate", uri, Dom0Domain)
	dpMust(c, "Datapath.detach", uri, Dom0Domain)
}

func dpUnknownURI(c *Ctx) {
	uri := "smapitest-unknown-scheme:///smapitest/nonexistent"
	for _, m := range []string{"Datapath.attach", "Datapath.activate"} {
		r, _ := c.Call(m, dpParams(uri, GuestDomain))
		if r.ExitCode == 0 {
			c.T.Errorf("%s of %s succeeded; a URI the plugin cannot serve must be an error", m, uri)
		}
	}
}

func dpDetachNever(c *Ctx, v DatapathVolumes) {
	uri := v.NewURI(c)
	dpMust(c, "Datapath.deactivate", uri, GuestDomain)
	dpMust(c, "Datapath.detach", uri, GuestDomain)
	dpMust(c, "Datapath.detach", uri, "")
}

func sameBackend(a, b smapi.Backend) bool { return js(a) == js(b) }

func js(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

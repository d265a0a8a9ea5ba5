package datapath

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/tests/vm"
)

func startGuest(t *testing.T) *Guest {
	testenv.Tools(t, "qemu-system-x86_64", "qemu-img", "qemu-nbd")
	m := vm.Start(t, vm.Config{})
	return Install(t, m)
}

func (g *Guest) call(t *testing.T, method, uri, domain string) smapitest.Reply {
	t.Helper()
	r, err := smapitest.Call(context.Background(), g, method, map[string]string{"dbg": "vm", "uri": uri, "domain": domain})
	require.NoError(t, err)
	require.Equal(t, 0, r.ExitCode, "%s %s: %s\nstderr: %s", method, domain, r.Stdout, r.Stderr)
	return r
}

func (g *Guest) attach(t *testing.T, uri, domain string) string {
	t.Helper()
	var b smapi.Backend
	require.NoError(t, json.Unmarshal(g.call(t, "Datapath.attach", uri, domain).Stdout, &b))
	require.Len(t, b.Implementations, 2)
	require.Equal(t, "vbd3", b.Implementations[0].XenDisk.BackendType)
	return b.Implementations[1].BlockDevice.Path
}

// TestVMConformance runs the generic datapath cases against the installed
// binary in a guest, each attach checked to be a real block device.
func TestVMConformance(t *testing.T) {
	g := startGuest(t)
	n := 0
	smapitest.Run(t, smapitest.Config{
		Invoker: g, Table: luksext.DatapathTable(luksext.Deps{}), Plugin: luksext.PluginName,
		Lifecycle: smapitest.DatapathCases(smapitest.DatapathVolumes{
			NewURI: func(c *smapitest.Ctx) string {
				n++
				p := fmt.Sprintf("/tmp/conf%d.vhd", n)
				g.MustRun(t, "qemu-img create -q -f vpc -o subformat=dynamic "+p+" 4M")
				return luksext.VolumeURI(p)
			},
			CheckBackend: func(c *smapitest.Ctx, b smapi.Backend) {
				dev := b.Implementations[1].BlockDevice.Path
				if out, rc := g.M.Run(t, "test -b \"$(readlink -f "+dev+")\""); rc != 0 {
					c.T.Errorf("%s is not a block device in the guest: %s", dev, out)
				}
			},
		}),
	})
	assert.Equal(t, "", g.MustRun(t, "tap-ctl list"), "every case tore down its tapdisk")
}

// TestVMWriteThroughTapdevReachesTheImage writes a pattern through the
// device Datapath.attach returned and reads it back from the image file
// with an independent reader (libvhdi for VHD, qemu-img for qcow2).
func TestVMWriteThroughTapdevReachesTheImage(t *testing.T) {
	g := startGuest(t)
	g.MustRun(t, "head -c 1M /dev/urandom > /tmp/pat")
	for _, tc := range []struct{ file, create, check string }{
		{"/tmp/a.vhd", "qemu-img create -q -f vpc -o subformat=dynamic /tmp/a.vhd 8M",
			`python3 -c 'import pyvhdi,sys
f=pyvhdi.file(); f.open("/tmp/a.vhd"); f.seek_offset(1<<20); d=f.read_buffer(1<<20)
sys.exit(0 if d==open("/tmp/pat","rb").read() else 1)'`},
		{"/tmp/b.qcow2", "qemu-img create -q -f qcow2 /tmp/b.qcow2 8M",
			"qemu-img convert -f qcow2 -O raw /tmp/b.qcow2 /tmp/b.raw && cmp -i 0:1048576 -n 1048576 /tmp/pat /tmp/b.raw"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			g.MustRun(t, tc.create)
			uri := luksext.VolumeURI(tc.file)
			dev := g.attach(t, uri, "7")
			assert.Regexp(t, `^/dev/xen/blktap-2/tapdev\d+$`, dev)
			g.call(t, "Datapath.activate", uri, "7")
			g.MustRun(t, "dd if=/tmp/pat of="+dev+" bs=64k seek=16 oflag=direct conv=fsync status=none")
			g.call(t, "Datapath.deactivate", uri, "7")
			g.call(t, "Datapath.detach", uri, "7")
			assert.Equal(t, "", g.MustRun(t, "tap-ctl list"))
			g.MustRun(t, tc.check)
			// The check can fail: a different pattern must not match.
			g.MustRun(t, "head -c 1M /dev/urandom > /tmp/other; ! cmp -s /tmp/pat /tmp/other")
		})
	}
}

// TestVMTwoDomainsAndRepeats: the second domain reuses the tapdisk, the
// first one's detach leaves the device working, the last detach tears it
// down; every call repeated.
func TestVMTwoDomainsAndRepeats(t *testing.T) {
	g := startGuest(t)
	g.MustRun(t, "qemu-img create -q -f vpc -o subformat=dynamic /tmp/s.vhd 8M && head -c 64k /dev/urandom > /tmp/pat")
	uri := luksext.VolumeURI("/tmp/s.vhd")
	var dev string
	for i := 0; i < 3; i++ {
		d := g.attach(t, uri, "7")
		require.True(t, dev == "" || dev == d)
		dev = d
		g.call(t, "Datapath.activate", uri, "7")
	}
	const dom0 = "u0_vbd_0_xvdb"
	for i := 0; i < 3; i++ {
		assert.Equal(t, dev, g.attach(t, uri, dom0))
		g.call(t, "Datapath.activate_readonly", uri, dom0)
	}
	list := g.MustRun(t, "tap-ctl list")
	assert.Equal(t, 1, strings.Count(list, "pid="), "one tapdisk: %s", list)
	g.MustRun(t, "dd if=/tmp/pat of="+dev+" oflag=direct conv=fsync status=none")
	for i := 0; i < 3; i++ {
		g.call(t, "Datapath.deactivate", uri, "7")
		g.call(t, "Datapath.detach", uri, "7")
	}
	g.MustRun(t, "cmp -n 65536 /tmp/pat "+dev)
	for i := 0; i < 3; i++ {
		g.call(t, "Datapath.detach", uri, dom0)
	}
	assert.Equal(t, "", g.MustRun(t, "tap-ctl list"))
	g.MustRun(t, "! test -e "+dev+" && ! test -e /sys/block/nbd0/pid && ! pgrep -f __tapdisk")
	g.MustRun(t, "qemu-img convert -f vpc -O raw /tmp/s.vhd /tmp/s.raw && cmp -n 65536 /tmp/pat /tmp/s.raw")
}

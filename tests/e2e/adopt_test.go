package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/tests/datapath"
	"github.com/luksext/luksext/tests/vm"
)

// adoptAnswer is `luksext adopt --json` (/work/notes/18-adopt-api.md).
type adoptAnswer struct {
	SRUUID   string `json:"sr_uuid"`
	Device   string `json:"device"`
	LUKSUUID string `json:"luks_uuid"`
	Layout   string `json:"layout"`
	Changed  bool   `json:"changed"`
	Volumes  []struct {
		Key         string `json:"key"`
		Name        string `json:"name"`
		Description string `json:"description"`
		Parent      string `json:"parent"`
		VirtualSize int64  `json:"virtual_size"`
		Hidden      bool   `json:"hidden"`
	} `json:"volumes"`
	DeviceConfig map[string]string `json:"device_config"`
	XE           []string          `json:"xe"`
	Error        *struct {
		Kind     string `json:"kind"`
		Message  string `json:"message"`
		ExitCode int    `json:"exit_code"`
	} `json:"error"`
}

// adoptCrashSteps are adopt's commit steps, in order; the command
// SIGKILLs itself right after the step named in LUKSEXT_ADOPT_CRASH_AFTER
// (sr-types/luksext/sr_adopt_steps.go). The last one, "ready", is the
// finished adoption: a kill after it is a run whose answer was lost, which
// the test's rerun on the adopted disk covers.
var adoptCrashSteps = []string{"luks-metadata", "journal", "records", "sr-record", "commit", "closed"}

// adopt runs the installed `luksext adopt DEV --json [args]` with env
// prepended; it returns the exit code and the decoded answer (nil when
// stdout is not JSON, e.g. after a kill).
func (g *guest) adopt(t *testing.T, env string, dev string, args ...string) (int, *adoptAnswer, luksextRun) {
	t.Helper()
	quoted := []string{"adopt", shq(dev), "--json"}
	for _, a := range args {
		quoted = append(quoted, shq(a))
	}
	out, _ := g.Run(t, fmt.Sprintf(`%s %s/root/usr/sbin/luksext %s </dev/null >%s/adopt.out 2>%s/adopt.err; echo "EXIT=$?"`,
		env, g.work, strings.Join(quoted, " "), g.work, g.work))
	i := strings.LastIndex(out, "EXIT=")
	require.GreaterOrEqual(t, i, 0, out)
	code, err := strconv.Atoi(strings.TrimSpace(out[i+5:]))
	require.NoError(t, err, out)
	stdout, _ := os.ReadFile(filepath.Join(g.work, "adopt.out"))
	stderr, _ := os.ReadFile(filepath.Join(g.work, "adopt.err"))
	r := luksextRun{Stdout: string(stdout), Stderr: string(stderr), Exit: code}
	t.Logf("%s luksext adopt %s %s → exit %d\n%s%s", env, dev, strings.Join(args, " "), code, r.Stdout, r.Stderr)
	var a adoptAnswer
	if json.Unmarshal(stdout, &a) != nil {
		return code, nil, r
	}
	return code, &a, r
}

// TestAdoptHandmadeSR is issue 18 in the VM tier, on one guest with one
// reboot: an SR built by hand exactly like seed 01's recipe (see
// handmade_test.go) is taken over in place by the installed `luksext
// adopt`, then used through the installed plugins the way
// xapi-storage-script calls them; and the copy path (a VDI written whole
// through a read-write dom0 attach, read back through a read-only one).
// Everything runs against dom0's tools (dom0Profiles[0]: cryptsetup
// 1.7.4, util-linux 2.23.2, XCP-ng's mke2fs.conf), the disk's making
// included; handmade_test.go says what still differs from a real host.
func TestAdoptHandmadeSR(t *testing.T) {
	g := bootGuest(t, vm.Config{Disks: []int64{64 << 20, 40 << 20}, TPM: true})
	prof := dom0Profiles[0]
	g.applyDom0Profile(t, prof)
	g.startXAPI(t, map[string]string{})
	dp := datapath.Install(t, g.Machine)
	const dev = "/dev/vda"
	h := buildHandmadeSR(t, g, dev)
	// An SR's files are old: a collector that took any of them for an
	// orphan (10 minutes without a record) would delete it at once.
	g.MustRun(t, fmt.Sprintf("touch -d '2 hours ago' %s/*.vhd", h.Mount))
	h.detachLikeAdmin(t, g)
	names := filepath.Join(g.work, "vdi-list.txt")
	require.NoError(t, os.WriteFile(names, []byte(h.namesDump()), 0o644))

	t.Run("copy path: a VDI written whole through a read-write dom0 attach, read back read-only", func(t *testing.T) {
		copyPath(t, g, dp)
	})

	// What must not change when adopt refuses: the LUKS header with its
	// keyslots and luksmeta slots, and the SR's files.
	headerState := func(t *testing.T) string {
		return g.MustRun(t, "cryptsetup luksDump "+dev+" | grep -v '^Device'; luksmeta show -d "+dev)
	}
	withSRMounted := func(t *testing.T, script string) string {
		return g.MustRun(t, fmt.Sprintf(`set -e
cryptsetup open --key-file %[1]s %[2]s %[3]s
vgchange -ay %[4]s >/dev/null
mount %[5]s %[6]s
cd %[6]s
%[7]s
cd /
umount %[6]s
vgchange -an %[4]s >/dev/null
cryptsetup close %[3]s`, h.KeyFile, dev, h.Mapping, h.VG, h.LV, h.Mount, script))
	}
	hdr := headerState(t)

	t.Run("refusals leave the disk as it was", func(t *testing.T) {
		// The old mapping still open (the systemd unit not disabled).
		g.MustRun(t, fmt.Sprintf("cryptsetup open --key-file %s %s %s", h.KeyFile, dev, h.Mapping))
		code, a, r := g.adopt(t, "", dev, "--names", names)
		assert.Equal(t, 6, code, r.Stderr)
		if assert.NotNil(t, a) && assert.NotNil(t, a.Error) {
			assert.Equal(t, "In_use", a.Error.Kind)
			assert.Contains(t, a.Error.Message, h.Mapping)
		}
		// ... and the LV mounted on it (SMAPIv1 still has the SR plugged).
		g.MustRun(t, fmt.Sprintf("vgchange -ay %s >/dev/null && mount %s %s", h.VG, h.LV, h.Mount))
		code, a, r = g.adopt(t, "", dev, "--names", names)
		assert.Equal(t, 6, code, r.Stderr)
		if assert.NotNil(t, a) && assert.NotNil(t, a.Error) {
			assert.Equal(t, "In_use", a.Error.Kind)
		}
		g.MustRun(t, fmt.Sprintf("umount %s && vgchange -an %s >/dev/null && cryptsetup close %s", h.Mount, h.VG, h.Mapping))

		// Files luksext does not handle, and a chain that does not
		// resolve: refused, each one named.
		const gone = "5f000000-0000-4000-8000-0000000000ff"
		bad := []string{
			"5f000000-0000-4000-8000-000000000001.raw", // a raw VDI
			handmadeVDIA + ".cbtlog",                   // CBT enabled
			"OLD_" + handmadeVDIC + ".vhd",             // cleanup.py mid-coalesce
			"relink_" + handmadeVDIA,                   // a GC journal
			handmadeVDIC + ".vhdcache",                 // IntelliCache
			"5f000000-0000-4000-8000-000000000002.vhd", // its parent is gone
		}
		withSRMounted(t, fmt.Sprintf(`truncate -s 1M %[1]s
: > %[2]s; cp %[7]s.vhd %[3]s; : > %[4]s; : > %[5]s
%[8]s create -n %[9]s.vhd -s 4
%[8]s snapshot -n %[6]s -p %[9]s.vhd
rm %[9]s.vhd`, bad[0], bad[1], bad[2], bad[3], bad[4], bad[5], handmadeVDIC, h.VhdUtil, gone))
		code, a, r = g.adopt(t, "", dev, "--names", names)
		assert.Equal(t, 7, code, r.Stderr)
		if assert.NotNil(t, a) && assert.NotNil(t, a.Error) {
			assert.Equal(t, "Not_adoptable", a.Error.Kind)
			for _, f := range bad {
				assert.Contains(t, a.Error.Message, f, "the refusal names what it found")
			}
		}
		assert.Equal(t, hdr, headerState(t), "a refused adopt wrote nothing to the LUKS header")
		withSRMounted(t, "rm -f "+strings.Join(bad, " ")+"\ntest ! -e .luksext && test ! -e luksext-sr.json")
	})

	// Checksums of every image file as SMAPIv1 left them: adopt and the
	// GC must not change a byte.
	const sumScript = "ls -il --time-style=+%s *.vhd filelog.txt | awk '{print $1, $6, $7, $8}'; sha256sum *.vhd filelog.txt"
	sums := func(t *testing.T, dir string) string { return g.MustRun(t, "cd "+dir+" && "+sumScript) }
	before := withSRMounted(t, sumScript)

	var final *adoptAnswer
	// The PBD's device-config adopt prints (checked in "the answer").
	cfg := map[string]string{"device": "/dev/disk/by-id/virtio-luksext-disk0", "sr_uuid": h.SR, "luks-uuid": h.LUKSUUID}
	t.Run("kill -9 after each step of adopt, reruns converge", func(t *testing.T) {
		for _, step := range adoptCrashSteps {
			code, _, r := g.adopt(t, "LUKSEXT_ADOPT_CRASH_AFTER="+step, dev, "--names", names)
			require.Equal(t, 137, code, "adopt should have been killed after %s: %s", step, r.Stderr)
			// Half adopted: SR.attach refuses and says what to do.
			rec := g.fails(t, "SR.attach", attachParams(cfg), "Needs_attention")
			assert.Contains(t, rec.Params[1], "luksext adopt", "after %s", step)
			if step == "sr-record" {
				// The collector refuses to touch a half-adopted SR.
				out, rc := g.Run(t, fmt.Sprintf("%s/root/usr/libexec/luksext/volume gc /run/luksext/adopt-%s -once 2>&1", g.work, h.SR))
				assert.NotEqual(t, 0, rc, "volume gc on a half-adopted SR: %s", out)
				assert.Contains(t, out, "not complete")
			}
		}
		// The last rerun, without --names: the names were staged.
		code, a, r := g.adopt(t, "", dev)
		require.Equal(t, 0, code, r.Stderr)
		require.NotNil(t, a)
		assert.True(t, a.Changed, "the run that finished the adoption says it changed the disk")
		final = a
		// Killed after the last step (the answer lost), then run again.
		code, _, r = g.adopt(t, "LUKSEXT_ADOPT_CRASH_AFTER=ready", dev, "--names", names)
		assert.Equal(t, 0, code, "an adopted disk is not adopted again (no step runs, no kill): %s", r.Stderr)
		code, again, r := g.adopt(t, "", dev, "--names", names)
		require.Equal(t, 0, code, r.Stderr)
		require.NotNil(t, again)
		// The "already adopted" answer: the same SR and device-config, no
		// volume list (it does not open the disk; 18-adopt-api.md).
		assert.False(t, again.Changed, "a rerun on an adopted disk changes nothing")
		assert.Equal(t, final.DeviceConfig, again.DeviceConfig)
		assert.Equal(t, final.XE, again.XE)
		assert.Equal(t, final.SRUUID, again.SRUUID)
	})
	require.NotNil(t, final, "adopt did not complete")

	t.Run("the answer", func(t *testing.T) {
		assert.Equal(t, h.SR, final.SRUUID)
		assert.Equal(t, h.LUKSUUID, final.LUKSUUID)
		assert.Equal(t, "lvm", final.Layout)
		assert.Equal(t, cfg, final.DeviceConfig)
		type vol struct {
			Key, Name, Description, Parent string
			Size                           int64
			Hidden                         bool
		}
		var want, got []vol
		for _, v := range h.VDIs {
			name, desc := v.Name, v.Description
			if v.Hidden {
				name, desc = "", ""
			}
			want = append(want, vol{v.UUID, name, desc, v.Parent, v.Size, v.Hidden})
		}
		for _, v := range final.Volumes {
			name, desc := v.Name, v.Description
			if v.Hidden {
				name, desc = "", ""
			}
			got = append(got, vol{v.Key, name, desc, v.Parent, v.VirtualSize, v.Hidden})
		}
		assert.ElementsMatch(t, want, got)
		joined := strings.Join(final.XE, "\n")
		assert.Contains(t, joined, "xe sr-introduce uuid="+h.SR+" type=luksext")
		assert.Contains(t, joined, "device-config:luks-uuid="+h.LUKSUUID)
		assert.Equal(t, hdrKeyslots(hdr), hdrKeyslots(headerState(t)), "the passphrase and clevis keyslots are untouched")
	})

	var sr string
	t.Run("attach, ls, stat: the old uuids, parents and names", func(t *testing.T) {
		g.ok(t, "SR.attach", attachParams(final.DeviceConfig), &sr)
		assert.Equal(t, h.Mount, sr)
		assert.Contains(t, g.MustRun(t, "lsblk -no NAME,TYPE "+dev), "lvm", "the SR is the LV on the LUKS mapping, in place")
		// The operator command knows the inherited keyslots.
		st, code := g.dom0Status(t, h.SR)
		assert.Equal(t, 0, code, "the adopted SR unlocks by itself")
		kinds := map[int]string{}
		for _, k := range st.SRs[0].Keyslots {
			kinds[k.Keyslot] = k.Kind
			if k.Kind == "binding" {
				require.NotNil(t, k.Unseals)
				assert.True(t, *k.Unseals, "clevis's tpm2 binding unseals: %s", k.Error)
			}
		}
		assert.Equal(t, map[int]string{0: "passphrase", 1: "binding"}, kinds, "the recipe's passphrase and clevis keyslots")
		var vols []smapi.Volume
		g.ok(t, "SR.ls", map[string]any{"dbg": "t", "sr": sr}, &vols)
		var keys []string
		for _, v := range vols {
			keys = append(keys, v.Key)
		}
		sort.Strings(keys)
		want := []string{handmadeVDIA, handmadeSnap, handmadeVDIC}
		sort.Strings(want)
		assert.Equal(t, want, keys, "exactly the old VDIs: the base copy is an internal node")
		for _, v := range h.VDIs {
			if v.Hidden {
				g.fails(t, "Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": v.UUID}, "Volume_does_not_exist")
				continue
			}
			var st smapi.Volume
			g.ok(t, "Volume.stat", map[string]any{"dbg": "t", "sr": sr, "key": v.UUID}, &st)
			assert.Equal(t, v.UUID, st.Key)
			if assert.NotNil(t, st.UUID, "Volume.uuid is what xapi's scan matches VDIs by") {
				assert.Equal(t, v.UUID, *st.UUID, "the volume's uuid is the VDI's: xapi keeps the VDI")
			}
			assert.True(t, st.ReadWrite, "%s: read-write, as xapi had it", v.UUID)
			assert.Equal(t, v.Name, st.Name)
			assert.Equal(t, v.Description, st.Description)
			assert.Equal(t, v.Size, st.VirtualSize)
			require.Len(t, st.URI, 1)
			assert.Equal(t, "luksext://"+h.Mount+"/"+v.UUID+".vhd", st.URI[0])
		}
		// Parents, as the SR records them (the chain xapi never sees).
		for _, v := range h.VDIs {
			rec := g.MustRun(t, fmt.Sprintf("cat %s/.luksext/nodes/%s.json", h.Mount, v.UUID))
			var n struct {
				Parent string          `json:"parent"`
				VDI    json.RawMessage `json:"vdi"`
			}
			require.NoError(t, json.Unmarshal([]byte(rec), &n), rec)
			assert.Equal(t, v.Parent, n.Parent, "%s's parent", v.UUID)
			assert.Equal(t, v.Hidden, len(n.VDI) == 0 || string(n.VDI) == "null", "%s: a VDI unless hidden", v.UUID)
		}
	})

	t.Run("data through the datapath equals what was written", func(t *testing.T) {
		// Read-only dom0 attaches, as an export does. The VDI and its
		// snapshot are differencing VHDs over the base copy: the fake
		// tap-ctl must serve VHD chains as tapdisk does (issue 12's fake);
		// one that hands a VHD to qemu-nbd's vpc driver reads a
		// differencing disk without its parent, and this step fails.
		for _, v := range h.VDIs {
			if v.Hidden {
				continue
			}
			uri := "luksext://" + h.Mount + "/" + v.UUID + ".vhd"
			domain := "u0_adopt_" + v.UUID[:8]
			dev := dpAttachMode(t, dp, uri, domain, true)
			out := filepath.Join(g.work, "read-"+v.UUID[:8])
			g.MustRun(t, fmt.Sprintf("dd if=%s of=%s bs=1M count=%d iflag=direct status=none", dev, out, v.Size>>20))
			dpDetach(t, dp, uri, domain)
			got, err := os.ReadFile(out)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(v.Shadow, got), "%s (%s) reads back as written", v.UUID, v.Name)
		}
	})

	t.Run("the GC leaves every file alone", func(t *testing.T) {
		// SR.attach started the collector, which made its first pass at
		// once; stop it and run passes in the foreground until it has
		// nothing left to do, so the check follows finished passes.
		g.MustRun(t, fmt.Sprintf(`set -e
pid=$(cat %[1]s/.luksext/gc/pid)
kill $pid 2>/dev/null || true
for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
LUKSEXT_LOG_LEVEL=debug %[2]s/root/usr/libexec/luksext/volume gc %[1]s -once 2>>%[2]s/gc.log`, sr, g.work))
		assert.Equal(t, before, sums(t, sr), "inode, size, mtime and contents of every image")
	})

	t.Run("detach", func(t *testing.T) {
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
		assert.Equal(t, "", g.MustRun(t, "ls /dev/mapper | grep -v control || true"), "no mapping, no LV left active")
	})

	g.Reboot(t)
	t.Run("after a reboot: attach unlocks with the TPM; stock clevis still opens the disk", func(t *testing.T) {
		g.assertDom0Profile(t, prof)
		g.startXAPI(t, map[string]string{})
		g.ok(t, "SR.attach", attachParams(final.DeviceConfig), &sr)
		var vols []smapi.Volume
		g.ok(t, "SR.ls", map[string]any{"dbg": "t", "sr": sr}, &vols)
		assert.Len(t, vols, 3)
		assert.Equal(t, before, sums(t, sr))
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
		g.MustRun(t, fmt.Sprintf(`set -e
clevis luks unlock -d %[1]s -n %[2]s
vgchange -ay %[3]s >/dev/null
mount -o ro %[4]s /mnt
(cd /mnt && %[5]s) > %[6]s/clevis-sums
umount /mnt
vgchange -an %[3]s >/dev/null
cryptsetup close %[2]s`, dev, h.Mapping, h.VG, h.LV, sumScript, g.work))
		got, err := os.ReadFile(filepath.Join(g.work, "clevis-sums"))
		require.NoError(t, err)
		assert.Equal(t, before, string(got), "opened by stock clevis, the SR's files are as SMAPIv1 left them")
	})
}

// hdrKeyslots is the keyslot part of a luksDump + luksmeta show: what must
// stay as it was (slot 0 the passphrase, slot 1 clevis).
func hdrKeyslots(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		f := strings.Fields(l)
		if strings.HasPrefix(l, "Key Slot 0") || strings.HasPrefix(l, "Key Slot 1") || len(f) == 3 && (f[0] == "0" || f[0] == "1") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// dpAttachMode is Datapath.attach + activate (or activate_readonly) for
// domain, returning the block device.
func dpAttachMode(t *testing.T, dp *datapath.Guest, uri, domain string, readOnly bool) string {
	t.Helper()
	if !readOnly {
		return dpAttach(t, dp, uri, domain)
	}
	p := map[string]string{"dbg": "t", "uri": uri, "domain": domain}
	r := dpCall(t, dp, "Datapath.attach", p)
	var b smapi.Backend
	require.NoError(t, json.Unmarshal(r, &b))
	require.Len(t, b.Implementations, 2)
	dpCall(t, dp, "Datapath.activate_readonly", p)
	return b.Implementations[1].BlockDevice.Path
}

// copyPath is what `xe vdi-copy` / `vm-copy` into a luksext SR and `PUT
// /import_raw_vdi` do (xen-api ocaml/xapi/sm_fs_ops.ml with_block_attached_device
// and vdi_copy: the destination attached in dom0 read-write, domain
// "u0_<...>", written whole by sparse_dd; here dd of a pattern file), then
// an export's read-only attach reads it back. An SR created by SR.create on
// the second disk; lvio (blktap's libvhd) reads the image file as the
// independent check.
func copyPath(t *testing.T, g *guest, dp *datapath.Guest) {
	const srUUID = "e4c0b1a2-9f8e-4d7c-8b6a-5f4e3d2c1b0a"
	var cfg map[string]string
	g.ok(t, "SR.create", createParams(srUUID, map[string]string{"device": "/dev/vdb"}), &cfg)
	var sr string
	g.ok(t, "SR.attach", attachParams(cfg), &sr)
	const size = 4 << 20
	var vol smapi.Volume
	g.ok(t, "Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "copied disk", "description": "vdi-copy destination", "size": size, "sharable": false}, &vol)
	g.ok(t, "Volume.set", map[string]any{"dbg": "t", "sr": sr, "key": vol.Key, "k": "vdi-type", "v": "user"}, nil)
	pat := make([]byte, size)
	_, _ = rand.Read(pat)
	patFile := filepath.Join(g.work, "copy-pattern")
	require.NoError(t, os.WriteFile(patFile, pat, 0o644))
	uri := vol.URI[0]

	const writer = "u0_copy_dest"
	dev := dpAttachMode(t, dp, uri, writer, false)
	g.MustRun(t, fmt.Sprintf("dd if=%s of=%s bs=1M oflag=direct conv=fsync status=none", patFile, dev))
	dpDetach(t, dp, uri, writer)

	const reader = "u0_export"
	dev = dpAttachMode(t, dp, uri, reader, true)
	out := filepath.Join(g.work, "copy-readback")
	g.MustRun(t, fmt.Sprintf("dd if=%s of=%s bs=1M count=%d iflag=direct status=none", dev, out, size>>20))
	_, code := g.Run(t, fmt.Sprintf("dd if=/dev/zero of=%s bs=512 count=1 oflag=direct status=none", dev))
	assert.NotEqual(t, 0, code, "a read-only attach refuses writes")
	dpDetach(t, dp, uri, reader)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(pat, got), "the read-only attach reads what the read-write one wrote")

	lvio := filepath.Join(g.work, "dom0-blktap", "bin", "lvio")
	raw := filepath.Join(g.work, "copy-lvio")
	g.MustRun(t, fmt.Sprintf("%s read %s %s", lvio, strings.TrimPrefix(uri, "luksext://"), raw))
	got, err = os.ReadFile(raw)
	require.NoError(t, err)
	assert.True(t, len(got) >= size && bytes.Equal(pat, got[:size]), "blktap's libvhd reads the pattern from the image")
	g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
}

func dpCall(t *testing.T, dp *datapath.Guest, method string, p map[string]string) []byte {
	t.Helper()
	r, err := dp.Invoke(t.Context(), method, mustJSON(t, p))
	require.NoError(t, err)
	require.Equal(t, 0, r.ExitCode, "%s: %s %s", method, r.Stdout, r.Stderr)
	return r.Stdout
}

func mustJSON(t *testing.T, v any) []byte {
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return b
}

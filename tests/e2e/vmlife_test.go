package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/tests/datapath"
	"github.com/luksext/luksext/tests/vm"
)

// A VM's life on a luksext SR, driven through the installed plugins in the
// call sequences of xapi-storage-script (xen-api
// ocaml/xapi-storage-script/main.ml): VDI.create = Volume.create +
// Volume.set vdi-type; VM start = Datapath.attach + activate; VM snapshot
// = Volume.snapshot + Volume.set of snapshot_time, is_a_snapshot,
// snapshot_of, content_id, vdi-type (+ tags on the VDI); export = attach
// in dom0 (domain "u0_<dp>") + Datapath.activate_readonly; reset-on-boot =
// VDI.epoch_begin (Volume.clone + Volume.set clone-on-boot) ... epoch_end
// (Volume.destroy of the clone + Volume.unset), every attach/activate/
// deactivate/detach following clone-on-boot to the clone.
//
// The oracle is a raw shadow of every write the guest's writer made
// through the tapdev (single 512-byte sectors inside 2 MiB blocks whose
// other sectors the parent holds), not the plugins' image code; the image
// files are also read by blktap's libvhd (lvio, ../shared/dom0) for VHD
// and by qemu-img for qcow2.
//
// The guest runs dom0's tools, not Debian's: the most dom0-like profile
// (dom0Profiles[0]: cryptsetup 1.7.4, so a LUKS1 SR; util-linux 2.23.2's
// blkid, mount and umount; e2fsprogs 1.47.0's upstream mke2fs.conf), as
// XCP-ng 8.3 has them (../shared/dom0/README.md). Debian's own tools are
// covered by TestSRLifecycle and TestAdminCommand. What is not dom0's:
// the kernel and udev (Debian 12's; dom0 runs 4.19 and systemd 219's),
// and tapdisk (tests/datapath's fake tap-ctl stands in).

const (
	lifeSR      = "3c1e9a52-7d4b-4f0e-9a61-5b2c8d7e6f10"
	lifeRegion  = 1 << 20 // the writer's region starts here ...
	lifeRegionN = 2 << 20 // ... and spans two VHD blocks, partly
	// Backups per format, each ~20 s of plugin calls and dom0 attaches
	// under TCG. VHD (the default format) gets the ten nightly backups;
	// qcow2 (the same volume logic over another image format) 3, which is
	// where what can break shows: backup 1 is a snapshot of a one-image
	// chain, 2 the first destroy of a previous snapshot (a hidden base for
	// the GC), 3+ the steady state.
	lifeBackupsVHD   = 10
	lifeBackupsQcow2 = 3
)

type lifeFormat struct {
	name    string
	size    int64
	read    int64 // bytes read from the start of a snapshot (the whole VHD; qcow2: past the region)
	backups int
}

func TestVMLife(t *testing.T) {
	testenv.Tools(t, "qemu-img", "qemu-nbd")
	dom0 := filepath.Join(repoRoot(t), "..", "shared", "dom0", "blktap", "bin")
	for _, tool := range []string{"lvio", "vhd-util"} {
		if _, err := os.Stat(filepath.Join(dom0, tool)); err != nil {
			testenv.Unavailable(t, "blktap's "+tool+" (../shared/dom0): "+err.Error())
		}
	}
	dom0, _ = filepath.Abs(dom0)
	g := bootGuest(t, vm.Config{Disks: []int64{96 << 20}, TPM: true, MemoryMiB: 1024})
	prof := dom0Profiles[0]
	g.applyDom0Profile(t, prof)
	g.startXAPI(t, map[string]string{})
	// A syslog, as dom0's rsyslog feeds /var/log/SMlog: the detached GC
	// logs only there, and its account is what a failure needs.
	g.MustRun(t, "busybox syslogd -O "+filepath.Join(g.work, "SMlog"))
	dp := datapath.Install(t, g.Machine)
	l := &life{g: g, dp: dp, dom0: dom0}
	t.Cleanup(func() {
		if t.Failed() {
			l.dump(t)
		}
	})
	var cfg map[string]string
	g.ok(t, "SR.create", createParams(lifeSR, map[string]string{"device": "/dev/vda"}), &cfg)
	g.ok(t, "SR.attach", attachParams(cfg), &l.sr)
	require.Equal(t, prof.LUKS, g.luksVersion(t, "/dev/vda"), "the SR is the LUKS version dom0's cryptsetup writes")
	g.assertMkfsFeatures(t, prof, "/dev/mapper/luksext-"+lifeSR)
	l.pat = make([]byte, 1<<20)
	_, _ = rand.Read(l.pat)
	require.NoError(t, os.WriteFile(filepath.Join(g.work, "life-pat"), l.pat, 0o644))

	l.used0 = l.used(t)
	for _, f := range []lifeFormat{
		{"vhd", 8 << 20, 8 << 20, lifeBackupsVHD},
		{"qcow2", 2100 << 30, 4 << 20, lifeBackupsQcow2},
	} {
		t.Run(f.name, func(t *testing.T) { l.nightlyBackups(t, f) })
	}
	t.Run("reset-on-boot", l.resetOnBoot)
	t.Run("gc", func(t *testing.T) { l.gcConverges(t, cfg) })
}

type life struct {
	g       *guest
	dp      *datapath.Guest
	dom0    string
	sr      string
	pat     []byte
	used0   int64 // df used (KiB) before any VDI
	usedMax int64
}

func (l *life) volume(t *testing.T, method string, params map[string]any, out any) {
	t.Helper()
	params["dbg"] = "life"
	params["sr"] = l.sr
	l.g.ok(t, method, params, out)
}

func (l *life) set(t *testing.T, key, k, v string) {
	t.Helper()
	l.volume(t, "Volume.set", map[string]any{"key": key, "k": k, "v": v}, nil)
}

func (l *life) stat(t *testing.T, key string) smapi.Volume {
	t.Helper()
	var v smapi.Volume
	l.volume(t, "Volume.stat", map[string]any{"key": key}, &v)
	require.Len(t, v.URI, 1)
	return v
}

func (l *life) dpCall(t *testing.T, method, uri, domain string) []byte {
	t.Helper()
	r, err := smapitest.Call(context.Background(), l.dp, method, map[string]string{"dbg": "life", "uri": uri, "domain": domain})
	require.NoError(t, err)
	if r.ExitCode != 0 { // the fake's account now, before anything else moves
		l.dump(t)
		// Where each tapdisk is stuck in the kernel (nbd_ioctl: NBD_DO_IT
		// waiting for the server's end of the socket to close).
		out, _ := l.g.Run(t, `dmesg | tail -n 20; for p in $(pgrep -f '__tapdisk'); do for s in /proc/$p/task/*/stack; do echo "== $s"; cat $s; done; done; cat /sys/block/nbd*/inflight`)
		t.Logf("tapdisk stacks:\n%s", out)
	}
	require.Equal(t, 0, r.ExitCode, "%s %s: %s %s", method, domain, r.Stdout, r.Stderr)
	return r.Stdout
}

// dump logs the fake tapdisks' account: devices, processes, control logs.
func (l *life) dump(t *testing.T) {
	smlog := filepath.Join(l.g.work, "SMlog")
	out, _ := l.g.Run(t, "tap-ctl list; ps -eo pid,stat,wchan:24,args | grep -E 'tapdisk|tap-ctl|qemu-nbd|luksext-gc|qemu-img' | grep -v grep; tail -n 40 /run/tap-ctl-fake/*.log; "+
		"echo '== SMlog, without debug lines'; grep -v 'level=debug' "+smlog+" | tail -n 80")
	t.Logf("fake tap-ctl state:\n%s", out)
}

// start is VM start (vdi_attach3 + vdi_activate3) on the URI Volume.stat
// names, following clone-on-boot; it returns the tapdev.
func (l *life) start(t *testing.T, key, domain string, readOnly bool) (string, string) {
	t.Helper()
	v := l.stat(t, key)
	if tmp, ok := v.Keys["clone-on-boot"]; ok {
		v = l.stat(t, tmp)
	}
	uri := v.URI[0]
	var b smapi.Backend
	require.NoError(t, json.Unmarshal(l.dpCall(t, "Datapath.attach", uri, domain), &b))
	require.Len(t, b.Implementations, 2)
	act := "Datapath.activate"
	if readOnly {
		act = "Datapath.activate_readonly"
	}
	l.dpCall(t, act, uri, domain)
	return b.Implementations[1].BlockDevice.Path, uri
}

func (l *life) stop(t *testing.T, key, domain string) {
	t.Helper()
	v := l.stat(t, key)
	if tmp, ok := v.Keys["clone-on-boot"]; ok {
		v = l.stat(t, tmp)
	}
	l.dpCall(t, "Datapath.deactivate", v.URI[0], domain)
	l.dpCall(t, "Datapath.detach", v.URI[0], domain)
}

// export reads n bytes of volume key through the datapath in dom0, read
// only, as an export/backup does, into a file in the work directory.
func (l *life) export(t *testing.T, key string, n int64, name string) []byte {
	t.Helper()
	domain := "u0_" + strings.ReplaceAll(name, "-", "_")
	dev, _ := l.start(t, key, domain, true)
	out := filepath.Join(l.g.work, name+".raw")
	l.g.MustRun(t, fmt.Sprintf("dd if=%s of=%s bs=1M count=%d iflag=direct status=none", dev, out, n>>20))
	l.stop(t, key, domain)
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Len(t, b, int(n))
	_ = os.Remove(out)
	return b
}

func (l *life) used(t *testing.T) int64 {
	out := l.g.MustRun(t, "sync; df -k --output=used "+l.sr+" | tail -1")
	v, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	require.NoError(t, err, out)
	return v
}

// writer is the guest's workload: single sectors at pseudo-random places
// of the region, each logged after its O_DIRECT write returned.
type writer struct {
	l    *life
	log  string
	stop string
	fill []byte
}

func (w *writer) sector(seq int) (off int64, data []byte) {
	off = lifeRegion + int64(seq*7919%(lifeRegionN/512))*512
	i := seq % 2048 * 512
	return off, w.l.pat[i : i+512]
}

// shadow is the first n bytes of the disk after the fill and writes 1..k.
func (w *writer) shadow(n int64, k int) []byte {
	s := make([]byte, n)
	copy(s[lifeRegion:], w.fill)
	for seq := 1; seq <= k; seq++ {
		off, d := w.sector(seq)
		copy(s[off:], d)
	}
	return s
}

// done is how many writes completed.
func (w *writer) done(t *testing.T) int {
	b, err := os.ReadFile(w.log)
	if os.IsNotExist(err) {
		return 0
	}
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if lines[0] == "" {
		return 0
	}
	require.NotContains(t, string(b), "ERR", "a write of the guest failed")
	return len(lines)
}

func (l *life) startWriter(t *testing.T, name, dev string) *writer {
	w := &writer{l: l, log: filepath.Join(l.g.work, name+"-writes.log"), stop: filepath.Join(l.g.work, name+"-stop")}
	w.fill = make([]byte, lifeRegionN)
	_, _ = rand.Read(w.fill)
	fill := filepath.Join(l.g.work, name+"-fill")
	require.NoError(t, os.WriteFile(fill, w.fill, 0o644))
	l.g.MustRun(t, fmt.Sprintf("dd if=%s of=%s bs=64k seek=%d oflag=direct,seek_bytes status=none", fill, dev, lifeRegion))
	script := fmt.Sprintf(`seq=1
while [ ! -e %[1]s ]; do
  off=$(( %[2]d + seq * 7919 %% %[3]d ))
  dd if=%[4]s of=%[5]s bs=512 count=1 skip=$(( seq %% 2048 )) seek=$off oflag=direct conv=notrunc status=none || { echo "ERR $seq" >> %[6]s; exit 1; }
  echo "$seq $off" >> %[6]s
  seq=$((seq + 1))
  sleep 0.05
done`, w.stop, lifeRegion/512, lifeRegionN/512, filepath.Join(l.g.work, "life-pat"), dev, w.log)
	sh := filepath.Join(l.g.work, name+"-writer.sh")
	require.NoError(t, os.WriteFile(sh, []byte(script), 0o755))
	l.g.MustRun(t, fmt.Sprintf("rm -f %s %s; setsid bash %s >/dev/null 2>&1 & echo $! > %s.pid", w.log, w.stop, sh, sh))
	t.Cleanup(func() { _ = os.WriteFile(w.stop, nil, 0o644) })
	return w
}

// halt stops the writer and waits until its last write returned.
func (w *writer) halt(t *testing.T) int {
	require.NoError(t, os.WriteFile(w.stop, nil, 0o644))
	w.l.g.MustRun(t, fmt.Sprintf("for i in $(seq 600); do kill -0 $(cat %s-writer.sh.pid) 2>/dev/null || exit 0; sleep 0.1; done; exit 1",
		strings.TrimSuffix(w.stop, "-stop")))
	return w.done(t)
}

// matchAt finds k in [lo, hi] such that got is the shadow after writes
// 1..k; -1 if none.
func (w *writer) matchAt(got []byte, lo, hi int) int {
	for k := lo; k <= hi; k++ {
		if bytes.Equal(got, w.shadow(int64(len(got)), k)) {
			return k
		}
	}
	return -1
}

func (l *life) nightlyBackups(t *testing.T, f lifeFormat) {
	var vol smapi.Volume
	l.volume(t, "Volume.create", map[string]any{"name": "life-" + f.name, "description": "a VM disk", "size": f.size, "sharable": false}, &vol)
	l.set(t, vol.Key, "vdi-type", "user")
	require.True(t, strings.HasSuffix(vol.URI[0], "."+f.name), "a %d-byte volume is a %s: %s", f.size, f.name, vol.URI[0])

	dev, _ := l.start(t, vol.Key, "1", false)
	w := l.startWriter(t, f.name, dev)
	prev := ""
	for n := 1; n <= f.backups; n++ {
		for w.done(t) < 3*n { // some writes between backups
			time.Sleep(100 * time.Millisecond)
		}
		lo := w.done(t)
		var snap smapi.Volume
		l.volume(t, "Volume.snapshot", map[string]any{"key": vol.Key}, &snap)
		hi := w.done(t) + 1 // + the write that may have been in flight
		for k, v := range map[string]string{"snapshot_time": time.Now().UTC().Format(time.RFC3339), "is_a_snapshot": "true",
			"snapshot_of": vol.Key, "content_id": fmt.Sprint(n), "vdi-type": "user"} {
			l.set(t, snap.Key, k, v)
		}
		l.set(t, vol.Key, "tags"+"nightly", "nightly")

		got := l.export(t, snap.Key, f.read, fmt.Sprintf("%s-backup-%d", f.name, n))
		k := w.matchAt(got, lo, hi)
		if k < 0 {
			later := w.matchAt(got, hi+1, w.done(t))
			t.Fatalf("backup %d of the %s VDI is not the disk at any moment of Volume.snapshot (writes %d..%d done then); "+
				"it matches the disk after write %d (-1: none), made after the snapshot returned", n, f.name, lo, hi, later)
		}
		if n == 1 || n == f.backups { // the independent readers, on the first and last
			l.oracle(t, f, l.stat(t, snap.Key).URI[0], w.shadow(f.read, k))
		}
		if prev != "" {
			l.volume(t, "Volume.destroy", map[string]any{"key": prev}, nil)
		}
		prev = snap.Key
		if u := l.used(t); u > l.usedMax {
			l.usedMax = u
		}
		t.Logf("backup %d: writes %d..%d in flight, snapshot = after write %d", n, lo, hi, k)
	}
	// VM shutdown.
	last := w.halt(t)
	l.stop(t, vol.Key, "1")
	got := l.export(t, vol.Key, f.read, f.name+"-final")
	assert.True(t, bytes.Equal(w.shadow(f.read, last), got), "the VDI after shutdown holds every write (%d)", last)
	l.oracle(t, f, vol.URI[0], w.shadow(f.read, last))
	l.volume(t, "Volume.destroy", map[string]any{"key": prev}, nil)
}

// oracle reads the image chain of uri with a reader independent of the
// plugins: blktap's libvhd (lvio) or qemu-img.
func (l *life) oracle(t *testing.T, f lifeFormat, uri string, want []byte) {
	t.Helper()
	file := strings.TrimPrefix(uri, "luksext://")
	out := filepath.Join(l.g.work, "oracle.raw")
	var cmd string
	if f.name == "vhd" {
		cmd = fmt.Sprintf("%s/lvio read %s %s", l.dom0, file, out)
	} else {
		cmd = fmt.Sprintf("qemu-img dd -U -f qcow2 -O raw bs=1M count=%d if=%s of=%s", len(want)>>20, file, out)
	}
	// The GC may move a parent between the open of two files: retry.
	var o string
	var code int
	for i := 0; i < 3; i++ {
		if o, code = l.g.Run(t, "rm -f "+out+"; "+cmd); code == 0 {
			break
		}
		time.Sleep(time.Second)
	}
	require.Equal(t, 0, code, "%s: %s", cmd, o)
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(b), len(want))
	assert.True(t, bytes.Equal(want, b[:len(want)]), "%s reads the chain of %s as the datapath's shadow", strings.Fields(cmd)[0], file)
}

// resetOnBoot starts and stops a reset-on-boot VDI twice (VDI.epoch_begin
// with persistent=false, as xapi-storage-script does without the
// NONPERSISTENT datapath feature), with a VM snapshot taken while it runs.
func (l *life) resetOnBoot(t *testing.T) {
	var vol smapi.Volume
	l.volume(t, "Volume.create", map[string]any{"name": "reset-on-boot", "description": "", "size": 4 << 20, "sharable": false}, &vol)
	l.set(t, vol.Key, "vdi-type", "user")
	dev, _ := l.start(t, vol.Key, "2", false)
	orig := make([]byte, 1<<20)
	_, _ = rand.Read(orig)
	require.NoError(t, os.WriteFile(filepath.Join(l.g.work, "rob-orig"), orig, 0o644))
	l.g.MustRun(t, fmt.Sprintf("dd if=%s/rob-orig of=%s bs=64k oflag=direct status=none", l.g.work, dev))
	l.stop(t, vol.Key, "2")
	for boot := 1; boot <= 2; boot++ {
		// epoch_begin
		if tmp, ok := l.stat(t, vol.Key).Keys["clone-on-boot"]; ok {
			l.volume(t, "Volume.destroy", map[string]any{"key": tmp}, nil)
		}
		var clone smapi.Volume
		l.volume(t, "Volume.clone", map[string]any{"key": vol.Key}, &clone)
		l.set(t, vol.Key, "clone-on-boot", clone.Key)
		dev, uri := l.start(t, vol.Key, "3", false)
		assert.Equal(t, clone.URI[0], uri, "the VM runs on the clone")
		l.g.MustRun(t, fmt.Sprintf("head -c 1M /dev/urandom | dd of=%s bs=64k oflag=direct status=none", dev))
		// A VM snapshot meanwhile: the snapshot is not reset-on-boot.
		var snap smapi.Volume
		l.volume(t, "Volume.snapshot", map[string]any{"key": vol.Key}, &snap)
		assert.NotContains(t, l.stat(t, snap.Key).Keys, "clone-on-boot", "Volume.snapshot copies only name and description")
		l.volume(t, "Volume.destroy", map[string]any{"key": snap.Key}, nil)
		l.stop(t, vol.Key, "3")
		// epoch_end
		l.volume(t, "Volume.destroy", map[string]any{"key": clone.Key}, nil)
		l.volume(t, "Volume.unset", map[string]any{"key": vol.Key, "k": "clone-on-boot"}, nil)
		got := l.export(t, vol.Key, 1<<20, fmt.Sprintf("rob-%d", boot))
		assert.True(t, bytes.Equal(orig, got), "boot %d: the disk is back to what it was", boot)
	}
	l.volume(t, "Volume.destroy", map[string]any{"key": vol.Key}, nil)
}

// files are the SR's image files and node records, and each VDI's chain
// as read from the files (vhd-util query -p, qemu-img info), leaf first.
func (l *life) files(t *testing.T) (images, records []string, chains map[string][]string) {
	out := l.g.MustRun(t, fmt.Sprintf(`cd %s && ls -1A | grep -vxE 'lost\+found|\.luksext|luksext-sr\.json' | tr '\n' ' '; echo; ls -1 .luksext/nodes | tr '\n' ' '`, l.sr))
	lines := strings.SplitN(out, "\n", 2)
	images = strings.Fields(lines[0])
	if len(lines) > 1 {
		for _, r := range strings.Fields(lines[1]) {
			records = append(records, strings.TrimSuffix(r, ".json"))
		}
	}
	var vols []smapi.Volume
	l.g.ok(t, "SR.ls", map[string]any{"dbg": "life", "sr": l.sr}, &vols)
	chains = map[string][]string{}
	for _, v := range vols {
		file := strings.TrimPrefix(v.URI[0], "luksext://")
		var script string
		if strings.HasSuffix(file, ".vhd") {
			// A query that fails (the GC may be moving the chain) ends
			// the chain with "?", which is never settled.
			script = fmt.Sprintf(`f=%s; echo "$f"; for i in $(seq 40); do p=$(%s/vhd-util query -n "$f" -p 2>&1) || { echo "?"; exit 0; }; case "$p" in *"has no parent"*) exit 0;; esac; f=$p; echo "$f"; done`, file, l.dom0)
		} else {
			script = fmt.Sprintf(`qemu-img info -U --backing-chain --output=json %s | sed -n 's/^ *"filename": "\(.*\)",*$/\1/p'`, file)
		}
		seen := map[string]bool{} // newer qemu-img also names each node's protocol file
		for _, f := range strings.Fields(l.g.MustRun(t, script)) {
			if f = filepath.Base(f); !seen[f] {
				seen[f] = true
				chains[v.Key] = append(chains[v.Key], f)
			}
		}
		require.NotEmpty(t, chains[v.Key], "the chain of %s", file)
	}
	return images, records, chains
}

// settled: every image has a record and every record an image, every
// VDI's chain is at most 2 images deep, and every image belongs to a
// VDI's chain (no hidden base left that nothing reads).
func (l *life) settled(t *testing.T) (bool, string) {
	images, records, chains := l.files(t)
	why := fmt.Sprintf("images %v, records %v, chains %v", images, records, chains)
	var ids []string
	for _, f := range images {
		ids = append(ids, strings.TrimSuffix(strings.TrimSuffix(f, ".vhd"), ".qcow2"))
	}
	if len(ids) != len(records) {
		return false, why
	}
	have := map[string]bool{}
	for _, r := range records {
		have[r] = true
	}
	for _, id := range ids {
		if !have[id] {
			return false, why
		}
	}
	used := map[string]bool{}
	for _, c := range chains {
		if len(c) > 2 || slices.Contains(c, "?") {
			return false, why
		}
		for _, f := range c {
			used[f] = true
		}
	}
	for _, f := range images {
		if !used[f] {
			return false, why
		}
	}
	return true, why
}

// waitSettled waits for the GC: every chain at most 2 deep, every image
// has a record and every record an image.
func (l *life) waitSettled(t *testing.T, timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		ok, why := l.settled(t)
		if ok {
			return why
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s the GC has not settled the SR: %s", timeout, why)
		}
		time.Sleep(5 * time.Second)
	}
}

func (l *life) gcRunning(t *testing.T) bool {
	_, code := l.g.Run(t, "pgrep -f '^luksext-gc ' >/dev/null")
	return code == 0
}

func (l *life) gcConverges(t *testing.T, cfg map[string]string) {
	t0 := time.Now()
	why := l.waitSettled(t, 3*time.Minute)
	t.Logf("settled after %s: %s", time.Since(t0).Round(time.Second), why)
	used := l.used(t)
	t.Logf("df used (KiB): before any VDI %d, max after a backup %d, now %d", l.used0, l.usedMax, used)
	assert.Less(t, used, l.usedMax, "the space of the destroyed snapshots came back")
	// Where the rest is: du of every entry of the SR (images, metadata).
	du := map[string]int64{}
	var sum int64
	for _, line := range strings.Split(strings.TrimSpace(l.g.MustRun(t, "cd "+l.sr+" && du -sk -- * .luksext")), "\n") {
		f := strings.Fields(line)
		require.Len(t, f, 2, line)
		k, err := strconv.ParseInt(f[0], 10, 64)
		require.NoError(t, err, line)
		du[f[1]] = k
		sum += k
	}
	t.Logf("du (KiB): %v", du)
	// Nothing holds space outside the files (a deleted image kept open by
	// a process, a leaked temporary): df agrees with du within 1 MiB.
	assert.LessOrEqual(t, used, l.used0+sum+1<<10, "df counts no space beyond the SR's files")
	// Each VDI left holds its data and its metadata, no more: the writer's
	// region is 2 MiB, which spans two whole 2 MiB VHD blocks (the VHD
	// also carries a block table sized for VHD's 2040 GiB maximum, 4 bytes
	// a block, as vhd-util snapshot -S does, so that it can grow online),
	// and 32 qcow2 clusters of 64 KiB; 1 MiB for headers and bitmaps.
	vhdBAT := int64(image.VHDMax/vhd.BlockSize*4) >> 10
	for f, k := range du {
		switch {
		case strings.HasSuffix(f, ".vhd"):
			assert.LessOrEqual(t, k, 4<<10+vhdBAT+1<<10, "VHD %s holds its two blocks and its block table, and little else", f)
		case strings.HasSuffix(f, ".qcow2"):
			assert.LessOrEqual(t, k, int64(lifeRegionN>>10+1<<10), "qcow2 %s holds its written clusters and little else", f)
		}
	}

	require.True(t, l.gcRunning(t), "the GC runs while the SR is attached")
	l.g.ok(t, "SR.detach", map[string]any{"dbg": "life", "sr": l.sr}, nil)
	assert.False(t, l.gcRunning(t), "SR.detach stopped the GC")
	l.g.ok(t, "SR.attach", attachParams(cfg), &l.sr)
	require.True(t, l.gcRunning(t), "SR.attach started the GC again")
	// It does work again: a snapshot destroyed leaves a base the GC folds.
	images, _, _ := l.files(t)
	var vols []smapi.Volume
	l.g.ok(t, "SR.ls", map[string]any{"dbg": "life", "sr": l.sr}, &vols)
	require.NotEmpty(t, vols)
	var snap smapi.Volume
	l.volume(t, "Volume.snapshot", map[string]any{"key": vols[0].Key}, &snap)
	l.volume(t, "Volume.destroy", map[string]any{"key": snap.Key}, nil)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		now, _, _ := l.files(t)
		if len(now) <= len(images) {
			break
		}
		require.True(t, time.Now().Before(deadline), "the GC did not fold the destroyed snapshot's base after SR.attach: %v (before: %v)", now, images)
		time.Sleep(5 * time.Second)
	}
	l.waitSettled(t, time.Minute)
}

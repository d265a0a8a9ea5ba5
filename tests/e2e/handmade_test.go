package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

// A hand-made encrypted SR, built in a guest exactly as the people issue
// 18 is for built theirs (../shared/seeds/01-*) on an XCP-ng 8.3 host: a
// LUKS1 disk (`cryptsetup luksFormat -s 512 -h sha512`) with a passphrase
// in keyslot 0, `clevis luks bind -d DEV tpm2 '{}'` (keyslot 1, luksmeta
// slot 1) against the guest's vTPM, opened as /dev/mapper/luks-<LUKS
// uuid> (the systemd unit's name), and an SMAPIv1 "ext" SR on that
// mapping as xcp-ng/sm 3.2.12 makes it. The VHD files are made with
// blktap's vhd-util and lvio (../shared/dom0/blktap), never with
// plugins/vhd, so the fixture is independent of the code under test.
//
// The caller puts a dom0 profile (dom0_test.go) in front first, so the
// disk is made with dom0's cryptsetup (1.7.4: what CentOS 7.5 and so
// XCP-ng 8.3 ship, LUKS1 only; its luksFormat default is LUKS1 as 2.0.3's
// is) and dom0's mke2fs.conf. What differs from a real host, and why:
//   - clevis: the recipe's `yum install clevis clevis-luks` on dom0 gets
//     CentOS 7's clevis, not the guest's Debian clevis 19, whose bind
//     cannot run against cryptsetup 1.7.4 (its luksAddKey passes `--pbkdf
//     pbkdf2 --pbkdf-force-iterations 1000`: "--pbkdf: unknown option",
//     nothing bound; against 2.0.3 it works). So the binding is made as
//     clevis's LUKS1 bind of that era makes it (latchset/clevis
//     src/luks/clevis-luks-bind, LUKS1 path): `pwmake <MK bits>` (pwmake
//     caps it at 256) as the new key, `clevis encrypt tpm2 '{}'` of it,
//     `luksmeta init`, `printf 'old\nkey\n' | cryptsetup luksAddKey
//     --key-slot N DEV` (its -s path, N the first free keyslot: 1.7.4's
//     -v prints no "Key slot N created." for the other path to parse;
//     `-i 1` added, see the PBKDF below), `luksmeta save -u
//     cb6e8904-... -s N` of the JWE. clevis encrypt/decrypt, jose and
//     luksmeta are Debian's builds (luksmeta links Debian's libcryptsetup
//     2.6, not dom0's 1.7.4 library); what they write (the JWE, luksmeta
//     v1 slots) is the format clevis on CentOS 7 writes. At the end
//     Debian's stock `clevis luks unlock` opens the adopted disk through
//     dom0's cryptsetup 1.7.4 (checked: it works there).
//   - lvm2: dom0 runs lvm2 2.02.180; the guest's is Debian 12's 2.03 (no
//     2.02 build here), so vgcreate/lvcreate/vgchange are Debian's.
//   - kernel and udev: Debian 12's, not 4.19 and systemd 219's udev.
//   - the PBKDF is cut (`-i 1`: 1 ms, LUKS1's floor of 1000 iterations)
//     in both keyslots: the recipe's `-i 10000` is 10 s of sha512 on a
//     real CPU, minutes under TCG, and clevis's default (1.7.4's 1 s,
//     benchmarked under TCG) made every unlock through the binding cost
//     seconds (the kill -9 step took 72 s instead of 29 s); the format
//     is the same.
//
// SMAPIv1's steps, from xcp-ng/sm v3.2.12:
//   - EXTSR.create (drivers/EXTSR.py, lvutil.createVG): `vgcreate
//     --metadatasize 10M XSLocalEXT-<sr> DEV`, `lvcreate -n <sr> -L
//     <free MiB> XSLocalEXT-<sr>`, `lvchange -ay`, `mkfs.ext4 -F`, mounted
//     at /var/run/sr-mount/<sr>. (createVG first zeroes the device's first
//     10 MiB with dd; skipped here: the mapping is fresh, vgcreate wipes
//     signatures anyway, and 10 MiB of AES costs ~10 s under TCG.)
//   - FileVDI.create (drivers/FileSR.py): `td-util create vhd <MiB>
//     <sr>/<uuid>.vhd`, which is `vhd-util create -n PATH -s MiB`
//     (blktap drivers/td.c td_create): a dynamic VHD.
//   - FileVDI._snapshot, SNAPSHOT_DOUBLE (vdi-snapshot): with the SR as
//     working directory (FileVDI.load chdirs there), hard-link
//     <vdi>.vhd to <base>.vhd (a new uuid), `td-util snapshot vhd
//     <vdi>.vhd.new <base>.vhd` (= `vhd-util snapshot -n CHILD -p
//     <base>.vhd`: a relative parent locator), rename <vdi>.vhd.new over
//     <vdi>.vhd, `td-util snapshot vhd <sr>/<snap>.vhd <base>.vhd`, then
//     vhdutil.setHidden(base) = `vhd-util set -n BASE -f hidden -v 1`.
//     xapi records the base as "base copy", managed=false.
//   - EXTSR.detach: umount, `lvchange -an /dev/XSLocalEXT-<sr>/<sr>`.
//
// Writes go through lvio, which writes sectors the way tapdisk does; the
// test keeps a raw shadow of every VDI's virtual disk to compare against.

// handmadeVDI is one VDI of the hand-made SR, as xapi knew it.
type handmadeVDI struct {
	UUID        string
	Name        string
	Description string
	Parent      string // uuid of the parent image; "" for none
	Hidden      bool   // a base copy: an internal node, not a VDI
	SnapshotOf  string // uuid of the VDI this is a snapshot of
	Size        int64  // virtual size
	Shadow      []byte // the virtual disk's contents (nil for hidden bases)
}

// handmadeSR is the SR and its disk.
type handmadeSR struct {
	Dev      string // the LUKS device, e.g. /dev/vda
	LUKSUUID string
	Mapping  string // luks-<LUKS uuid>
	SR       string // the SR uuid
	VG       string // XSLocalEXT-<sr>
	LV       string // /dev/XSLocalEXT-<sr>/<sr>
	Mount    string // /var/run/sr-mount/<sr>
	KeyFile  string // the keyslot-0 passphrase (the admin's), in the work dir
	VhdUtil  string // blktap's vhd-util, as the guest runs it
	Lvio     string // blktap's lvio
	VDIs     []handmadeVDI
}

const (
	handmadeSRUUID = "7a2f4c1d-5e3b-4a69-8c0d-1f2e3d4c5b6a"
	handmadeVDIA   = "1b7e2c90-3d4f-4a5b-9c6d-7e8f9a0b1c2d" // the VM's disk, snapshotted
	handmadeBase   = "2c8f3da1-4e50-4b6c-8d7e-8f9a0b1c2d3e" // its base copy (hidden)
	handmadeSnap   = "3d904eb2-5f61-4c7d-9e8f-9a0b1c2d3e4f" // the snapshot
	handmadeVDIC   = "4ea15fc3-6072-4d8e-8f90-0b1c2d3e4f50" // a second disk, no snapshot
	handmadePass   = "handmade-sr-admin-passphrase-18"
	// clevisLUKSMetaUUID is the luksmeta slot uuid clevis stores its JWE
	// under (clevis src/luks/clevis-luks-bind UUID=).
	clevisLUKSMetaUUID = "cb6e8904-81ff-40da-a84a-07ab9ab5715e"
)

// lvioWrite is one write through lvio: data at off of the VDI's disk.
type lvioWrite struct {
	off  int64
	data []byte
}

// buildHandmadeSR builds the SR on dev (at least 64 MiB) and leaves it as
// a running SMAPIv1 host has it: mapping open, LV active, mounted.
func buildHandmadeSR(t *testing.T, g *guest, dev string) *handmadeSR {
	t.Helper()
	testenv.Tools(t, "pwmake", "luksmeta", "clevis")
	tree := testenv.Dom0Tree(t, "blktap", g.work)
	h := &handmadeSR{Dev: dev, SR: handmadeSRUUID, VG: "XSLocalEXT-" + handmadeSRUUID,
		Mount:   "/var/run/sr-mount/" + handmadeSRUUID,
		VhdUtil: filepath.Join(tree, "bin", "vhd-util"), Lvio: filepath.Join(tree, "bin", "lvio")}
	h.LV = "/dev/" + h.VG + "/" + h.SR
	h.KeyFile = writeNamedKey(t, g, "handmade", handmadePass)

	// The disk (dom0's cryptsetup, the recipe's flags but -i) and its
	// clevis binding as clevis 7 makes it (see above).
	g.MustRun(t, fmt.Sprintf(`set -e
modprobe dm_crypt
cryptsetup luksFormat -q -s 512 -h sha512 -i 1 --key-file %[1]s %[2]s
bits=$(cryptsetup luksDump %[2]s | sed -rn 's|MK bits:[ \t]*([0-9]+)|\1|p')
key=$(pwmake "$bits" 2>/dev/null)
jwe=$(printf '%%s' "$key" | clevis encrypt tpm2 '{}')
luksmeta test -d %[2]s || luksmeta init -d %[2]s -f
slot=$(cryptsetup luksDump %[2]s | sed -rn 's|^Key Slot ([0-7]): DISABLED$|\1|p' | head -n 1)
test "$slot" = 1
printf '%%s\n%%s\n' "$(cat %[1]s)" "$key" | cryptsetup luksAddKey -i 1 --key-slot "$slot" %[2]s
printf '%%s' "$jwe" | luksmeta save -d %[2]s -u %[3]s -s "$slot"
`, h.KeyFile, dev, clevisLUKSMetaUUID))
	h.LUKSUUID = strings.TrimSpace(g.MustRun(t, "cryptsetup luksUUID "+dev))
	h.Mapping = "luks-" + h.LUKSUUID
	dump := g.MustRun(t, "cryptsetup luksDump "+dev+"; luksmeta show -d "+dev)
	require.Contains(t, dump, "Version:       \t1")
	require.Contains(t, dump, "Hash spec:     \tsha512")
	require.Contains(t, dump, "MK bits:       \t512")
	require.Contains(t, dump, "Key Slot 0: ENABLED")
	require.Contains(t, dump, "Key Slot 1: ENABLED")
	require.Regexp(t, `(?m)^1\s+active\s+`+clevisLUKSMetaUUID+`$`, dump, "clevis's luksmeta uuid in slot 1")

	// The systemd unit's open (by passphrase here; the test proves stock
	// clevis opens it after the adoption), then EXTSR.create.
	g.MustRun(t, fmt.Sprintf(`set -e
cryptsetup open --key-file %[1]s %[2]s %[3]s
vgcreate --metadatasize 10M %[4]s /dev/mapper/%[3]s
free=$(vgs --noheadings --units m --nosuffix -o vg_free %[4]s | tr -d ' ' | cut -d. -f1)
lvcreate -n %[5]s -L ${free}M %[4]s
lvchange -ay %[6]s
mkfs.ext4 -q -F %[6]s
mkdir -p %[7]s
mount %[6]s %[7]s
`, h.KeyFile, dev, h.Mapping, h.VG, h.SR, h.LV, h.Mount))

	rng := rand.New(rand.NewPCG(18, 1))
	data := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	const mib = 1 << 20
	a := handmadeVDI{UUID: handmadeVDIA, Name: "web01 system disk", Description: "made by hand, snapshotted once", Size: 8 * mib}
	c := handmadeVDI{UUID: handmadeVDIC, Name: "web01 data", Description: "", Size: 4 * mib}
	// Before the snapshot: a whole block's worth at the start, and a write
	// that covers only part of the second 2 MiB block.
	beforeA := []lvioWrite{{0, data(mib)}, {3*mib + 4096, data(512 << 10)}}
	// After it, on the VDI's new leaf: overlaps the parent's data in part.
	afterA := []lvioWrite{{512 << 10, data(256 << 10)}, {6 * mib, data(64 << 10)}}
	writesC := []lvioWrite{{mib + 512, data(64 << 10)}}

	h.createVHD(t, g, &a)
	h.createVHD(t, g, &c)
	h.write(t, g, &a, beforeA)
	h.write(t, g, &c, writesC)
	snapShadow := append([]byte(nil), a.Shadow...)
	h.snapshot(t, g, handmadeVDIA, handmadeBase, handmadeSnap)
	h.write(t, g, &a, afterA)
	a.Parent = handmadeBase
	base := handmadeVDI{UUID: handmadeBase, Name: "base copy", Parent: "", Hidden: true, Size: a.Size}
	snap := handmadeVDI{UUID: handmadeSnap, Name: "web01 system disk", Description: "before the upgrade",
		Parent: handmadeBase, SnapshotOf: handmadeVDIA, Size: a.Size, Shadow: snapShadow}
	h.VDIs = []handmadeVDI{a, base, snap, c}
	h.check(t, g)
	return h
}

func (h *handmadeSR) file(uuid string) string { return h.Mount + "/" + uuid + ".vhd" }

// createVHD is FileVDI.create: td-util create vhd <MiB> <path>.
func (h *handmadeSR) createVHD(t *testing.T, g *guest, v *handmadeVDI) {
	t.Helper()
	g.MustRun(t, fmt.Sprintf("cd %s && %s create -n %s -s %d", h.Mount, h.VhdUtil, h.file(v.UUID), v.Size>>20))
	v.Shadow = make([]byte, v.Size)
}

// write writes through lvio (sector-aligned, tapdisk's way) and into the
// shadow.
func (h *handmadeSR) write(t *testing.T, g *guest, v *handmadeVDI, ws []lvioWrite) {
	t.Helper()
	var script strings.Builder
	script.WriteString("set -e\n")
	for i, w := range ws {
		f := filepath.Join(g.work, fmt.Sprintf("handmade-%s-%d-%d", v.UUID[:8], w.off, i))
		require.NoError(t, os.WriteFile(f, w.data, 0o644))
		fmt.Fprintf(&script, "%s write %s %d %s\n", h.Lvio, h.file(v.UUID), w.off, f)
		copy(v.Shadow[w.off:], w.data)
	}
	g.MustRun(t, script.String())
}

// snapshot is FileVDI._snapshot(SNAPSHOT_DOUBLE), in the SR's directory,
// with the log lines util.start_log_entry and end_log_entry append to
// <sr>/filelog.txt around it (str(datetime.now()) timestamps).
func (h *handmadeSR) snapshot(t *testing.T, g *guest, vdi, base, snap string) {
	t.Helper()
	g.MustRun(t, fmt.Sprintf(`set -e
cd %[1]s
echo "$(date '+%%Y-%%m-%%d %%H:%%M:%%S.%%6N') log: %[1]s %[1]s/%[2]s.vhd vdi_clone %[6]s %[2]s %[4]s" >> filelog.txt
ln %[2]s.vhd %[3]s.vhd
%[5]s snapshot -n %[1]s/%[2]s.vhd.new -p %[3]s.vhd
mv %[1]s/%[2]s.vhd.new %[1]s/%[2]s.vhd
%[5]s snapshot -n %[1]s/%[4]s.vhd -p %[3]s.vhd
%[5]s set -n %[1]s/%[3]s.vhd -f hidden -v 1
echo "$(date '+%%Y-%%m-%%d %%H:%%M:%%S.%%6N') end: %[1]s %[1]s/%[2]s.vhd done" >> filelog.txt
`, h.Mount, vdi, base, snap, h.VhdUtil, h.SR))
}

// check is what SMAPIv1 itself would say of the files: vhd-util check on
// each, the chain and hidden flags vhd-util query reads, and every
// visible VDI's contents (lvio read follows the parent locators) equal
// to its shadow.
func (h *handmadeSR) check(t *testing.T, g *guest) {
	t.Helper()
	var names []string
	for _, v := range h.VDIs {
		names = append(names, v.UUID+".vhd")
	}
	ls := g.MustRun(t, "cd "+h.Mount+" && ls")
	require.ElementsMatch(t, append(names, "lost+found", "filelog.txt"), strings.Fields(ls), "the SR's files")
	for _, v := range h.VDIs {
		out := g.MustRun(t, fmt.Sprintf("cd %s && %s check -n %s && %s query -n %s -p -f -v", h.Mount, h.VhdUtil, h.file(v.UUID), h.VhdUtil, h.file(v.UUID)))
		lines := strings.Split(strings.TrimSpace(out), "\n")
		require.Len(t, lines, 4, out) // "... is valid", size MiB, parent, hidden
		require.Equal(t, fmt.Sprint(v.Size>>20), lines[1], "%s: virtual size", v.UUID)
		if v.Parent == "" {
			require.Contains(t, lines[2], "has no parent", "%s", v.UUID)
		} else {
			// vhd-util prints the resolved real path (/var/run is /run).
			require.Equal(t, v.Parent+".vhd", filepath.Base(lines[2]), "%s: parent (locator resolved)", v.UUID)
		}
		require.Equal(t, fmt.Sprintf("hidden: %d", b2i(v.Hidden)), lines[3], "%s", v.UUID)
		if v.Shadow != nil {
			raw := filepath.Join(g.work, "handmade-read-"+v.UUID[:8])
			g.MustRun(t, fmt.Sprintf("%s read %s %s", h.Lvio, h.file(v.UUID), raw))
			got, err := os.ReadFile(raw)
			require.NoError(t, err)
			require.True(t, len(got) >= len(v.Shadow) && string(got[:len(v.Shadow)]) == string(v.Shadow), "%s reads as its shadow", v.UUID)
			_ = os.Remove(raw)
		}
	}
	// The locators are relative, as td-util snapshot with a bare file name
	// in the SR's directory writes them: the SR can be mounted elsewhere.
	loc := g.MustRun(t, fmt.Sprintf("%s read -p -n %s", h.VhdUtil, h.file(handmadeSnap)))
	require.Contains(t, loc, "./"+handmadeBase+".vhd", "a relative parent locator")
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// detachLikeSMAPIv1 is EXTSR.detach (umount, lvchange -an), then what the
// README tells the admin: close the old mapping (its systemd unit is
// disabled on a real host).
func (h *handmadeSR) detachLikeAdmin(t *testing.T, g *guest) {
	t.Helper()
	g.MustRun(t, fmt.Sprintf(`set -e
umount %s
lvchange -an %s
vgchange -an %s
cryptsetup close %s
! test -e /dev/mapper/%s`, h.Mount, h.LV, h.VG, h.Mapping, h.Mapping))
}

// namesDump is `xe vdi-list sr-uuid=<sr> params=all` as xe prints it
// (xapi's cli_util record printer: "key ( RO): value", keys right-aligned,
// a blank line between records), for `luksext adopt --names`.
func (h *handmadeSR) namesDump() string {
	var b strings.Builder
	for _, v := range h.VDIs {
		isSnap, snapOf, managed := "false", "<not in database>", "true"
		if v.SnapshotOf != "" {
			isSnap, snapOf = "true", v.SnapshotOf
		}
		if v.Hidden {
			managed = "false"
		}
		smConfig := ""
		if v.Parent != "" {
			smConfig = "vhd-parent: " + v.Parent
		}
		rows := [][2]string{
			{"uuid ( RO)", v.UUID},
			{"name-label ( RW)", v.Name},
			{"name-description ( RW)", v.Description},
			{"is-a-snapshot ( RO)", isSnap},
			{"snapshot-of ( RO)", snapOf},
			{"snapshots ( RO)", ""},
			{"snapshot-time ( RO)", "20260101T10:00:00Z"},
			{"allowed-operations (SRO)", "snapshot; clone; copy; destroy"},
			{"current-operations (SRO)", ""},
			{"sr-uuid ( RO)", h.SR},
			{"sr-name-label ( RO)", "local ext luks"},
			{"vbd-uuids (SRO)", ""},
			{"crashdump-uuids (SRO)", ""},
			{"virtual-size ( RO)", fmt.Sprint(v.Size)},
			{"physical-utilisation ( RO)", "2109952"},
			{"location ( RO)", v.UUID},
			{"type ( RO)", "User"},
			{"sharable ( RO)", "false"},
			{"read-only ( RO)", fmt.Sprint(v.Hidden)},
			{"storage-lock ( RO)", "false"},
			{"managed ( RO)", managed},
			{"parent ( RO) [DEPRECATED]", "<not in database>"},
			{"missing ( RO)", "false"},
			{"is-tools-iso ( RO)", "false"},
			{"other-config (MRW)", ""},
			{"xenstore-data (MRO)", ""},
			{"sm-config (MRO)", smConfig},
			{"on-boot ( RW)", "persist"},
			{"allow-caching ( RW)", "false"},
			{"metadata-latest ( RO)", "false"},
			{"metadata-of-pool ( RO)", "<not in database>"},
			{"tags (SRW)", ""},
			{"cbt-enabled ( RO)", "false"},
		}
		// xe left-aligns the first key and right-aligns the others to the
		// longest key of the record.
		width := 0
		for _, r := range rows {
			width = max(width, len(r[0]))
		}
		for i, r := range rows {
			if i == 0 {
				fmt.Fprintf(&b, "%-*s: %s\n", width, r[0], r[1])
			} else {
				fmt.Fprintf(&b, "%*s: %s\n", width, r[0], r[1])
			}
		}
		b.WriteString("\n\n")
	}
	return b.String()
}

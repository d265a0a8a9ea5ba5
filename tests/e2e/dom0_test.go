package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/tests/vm"
)

// dom0Profile is the set of dom0 tool versions a guest runs the plugins
// against. XCP-ng 8.3's dom0 is a CentOS 7 userland: its cryptsetup is
// most likely 1.7.4 (CentOS 7.5, LUKS1 only), possibly 2.0.3 (CentOS
// 7.6-7.9, LUKS2 without token import); util-linux 2.23.2; e2fsprogs
// 1.47.0 with upstream's mke2fs.conf (../shared/dom0/README.md).
type dom0Profile struct {
	Name       string
	Cryptsetup string // dom0 tree ("cryptsetup-1.7.4"); "" keeps the guest's (Debian's)
	UtilLinux  bool   // blkid, mount, umount 2.23.2
	Mke2fsConf bool   // e2fsprogs 1.47.0's upstream mke2fs.conf
	LUKS       int    // the LUKS version SR.create writes with this cryptsetup
}

var dom0Profiles = []dom0Profile{
	{Name: "cryptsetup-1.7.4", Cryptsetup: "cryptsetup-1.7.4", UtilLinux: true, Mke2fsConf: true, LUKS: 1},
	{Name: "cryptsetup-2.0.3", Cryptsetup: "cryptsetup-2.0.3", UtilLinux: true, Mke2fsConf: true, LUKS: 2},
}

// applyDom0Profile replaces, in the guest, each tool at the path the
// plugins exec (plugins/run DefaultPaths) with a two-line wrapper that
// execs the dom0 build by absolute path (a bind mount would make the
// loader resolve $ORIGIN/../lib at the mount and load Debian's libraries),
// installs dom0's mke2fs.conf, and asserts that the versions are the ones
// asked for. /usr and /etc are overlays saved across Reboot, so the
// profile survives reboots like an installed package.
func (g *guest) applyDom0Profile(t *testing.T, p dom0Profile) {
	t.Helper()
	wrap := func(path, target string) string {
		return fmt.Sprintf("printf '#!/bin/sh\\nexec %%s \"$@\"\\n' %s > %s && chmod 755 %s\n", shq(target), path, path)
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	if p.Cryptsetup != "" {
		tree := testenv.Dom0Tree(t, p.Cryptsetup, g.work)
		script.WriteString(wrap("/usr/sbin/cryptsetup", filepath.Join(tree, "sbin", "cryptsetup")))
	}
	if p.UtilLinux {
		tree := testenv.Dom0Tree(t, "util-linux-2.23.2", g.work)
		script.WriteString(wrap("/usr/sbin/blkid", filepath.Join(tree, "bin", "blkid")))
		script.WriteString(wrap("/usr/bin/mount", filepath.Join(tree, "bin", "mount")))
		script.WriteString(wrap("/usr/bin/umount", filepath.Join(tree, "bin", "umount")))
	}
	if p.Mke2fsConf {
		script.WriteString(fmt.Sprintf("cp %s /etc/mke2fs.conf\n", shq(filepath.Join(testenv.Dom0Dir(), "e2fsprogs-1.47.0", "mke2fs.conf"))))
	}
	g.MustRun(t, script.String())
	g.assertDom0Profile(t, p)
}

// assertDom0Profile checks the versions the guest runs now.
func (g *guest) assertDom0Profile(t *testing.T, p dom0Profile) {
	t.Helper()
	out := g.MustRun(t, "cryptsetup --version; echo ---; blkid -V; echo ---; mount -V; echo ---; umount -V")
	t.Logf("dom0 profile %s:\n%s", p.Name, out)
	parts := strings.Split(out, "---\n")
	require.Len(t, parts, 4, out)
	if p.Cryptsetup != "" {
		assert.Equal(t, "cryptsetup "+strings.TrimPrefix(p.Cryptsetup, "cryptsetup-"), strings.TrimSpace(parts[0]))
	}
	if p.UtilLinux {
		// The 2.23.2 build prints "UNKNOWN" for its version (built from the
		// tag without a tarball's .version); its libblkid prints the 2.23
		// release date, and the wrappers name the 2.23.2 tree.
		assert.Contains(t, parts[1], "25-Apr-2013", "blkid is util-linux 2.23.2's")
		for i, tool := range []string{"blkid", "mount", "umount"} {
			assert.Contains(t, parts[i+1], "util-linux UNKNOWN", "%s is the dom0 build, not Debian's", tool)
		}
		wrappers := g.MustRun(t, "cat /usr/sbin/blkid /usr/bin/mount /usr/bin/umount")
		assert.Equal(t, 3, strings.Count(wrappers, "dom0-util-linux-2.23.2/bin/"), wrappers)
	}
	if p.Mke2fsConf {
		assert.Contains(t, g.MustRun(t, "grep -E '^\\s*features' /etc/mke2fs.conf"), "orphan_file")
	}
}

// assertMkfsFeatures checks the ext4 an SR got from dom0's mke2fs.conf
// (kernel 4.19 mounts it: orphan_file is a compat feature older kernels
// ignore, metadata_csum_seed is supported since 4.4).
func (g *guest) assertMkfsFeatures(t *testing.T, p dom0Profile, mapper string) {
	t.Helper()
	feats := g.MustRun(t, "dumpe2fs -h "+mapper+" 2>/dev/null | grep -i '^Filesystem features'")
	t.Logf("ext4 %s", strings.TrimSpace(feats))
	assert.Contains(t, feats, "metadata_csum")
	if p.Mke2fsConf {
		assert.Contains(t, feats, "orphan_file")
		assert.Contains(t, feats, "metadata_csum_seed")
	}
}

func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// TestDom0Matrix runs the SR story, the operator story and `make demo`'s
// scenario against each dom0 profile, one guest per profile (boots are
// the expensive part under TCG): create with a recovery passphrase,
// attach, use, detach, reboot, attach with no secret, volumes, destroy;
// bind, unbind, rebind after a PCR change, recovery set/rotate/remove,
// header backup/restore, kill -9 during a key removal; tests/demo/demo.sh.
// Debian's own tools are covered by TestSRLifecycle and TestAdminCommand.
func TestDom0Matrix(t *testing.T) {
	for _, p := range dom0Profiles {
		t.Run(p.Name, func(t *testing.T) {
			g := bootGuest(t, vm.Config{Disks: []int64{40 << 20, 40 << 20, 64 << 20}, TPM: true})
			g.applyDom0Profile(t, p)
			g.startXAPI(t, map[string]string{secretUUID: canary, adminSecret: adminRecovery})
			cfg := g.dom0SRStoryBeforeReboot(t, p)
			g.Reboot(t)
			g.assertDom0Profile(t, p)
			g.startXAPI(t, map[string]string{adminSecret: adminRecovery})
			g.dom0SRStoryAfterReboot(t, p, cfg)
			g.dom0OperatorStory(t, p)
			t.Run("host acceptance script refuses a disk holding data", func(t *testing.T) {
				// tests/host/acceptance.sh with stand-ins for xe and luksext
				// that log every call: /dev/vdb holds the operator story's
				// LUKS header, so the script must stop before calling either.
				stubs := filepath.Join(g.work, "stubs")
				require.NoError(t, os.MkdirAll(stubs, 0o755))
				for _, n := range []string{"xe", "luksext"} {
					require.NoError(t, os.WriteFile(filepath.Join(stubs, n), []byte("#!/bin/sh\necho \"$0 $*\" >> "+stubs+"/calls\n"), 0o755))
				}
				pw := writeNamedKey(t, g, "acceptance", adminRecovery)
				out, rc := g.Run(t, fmt.Sprintf("rm -f %s/calls; PATH=%s:$PATH bash %s --disk /dev/disk/by-id/virtio-luksext-disk1 --recovery-file %s 2>&1",
					stubs, stubs, shq(filepath.Join(repoRoot(t), "tests", "host", "acceptance.sh")), pw))
				assert.Equal(t, 2, rc, out)
				assert.Contains(t, out, "holds data")
				assert.Contains(t, out, "crypto_LUKS")
				_, err := os.Stat(filepath.Join(stubs, "calls"))
				assert.True(t, os.IsNotExist(err), "xe or luksext was called before the refusal")
			})
			t.Run("demo", func(t *testing.T) {
				out, rc := g.Run(t, "DISK=/dev/vdc bash "+shq(filepath.Join(repoRoot(t), "tests", "demo", "demo.sh"))+" 2>&1")
				t.Log(out)
				require.Equal(t, 0, rc, "demo.sh failed")
				assert.Contains(t, out, "recovery passphrase: OK")
				assert.Contains(t, out, "SECRET-PAYLOAD-written-by-make-demo")
				assert.Contains(t, g.MustRun(t, "cryptsetup luksDump /dev/vdc"), fmt.Sprintf("Version:       \t%d", p.LUKS))
			})
		})
	}
}

func (g *guest) dom0SRStoryBeforeReboot(t *testing.T, p dom0Profile) map[string]string {
	var cfg map[string]string
	t.Run("SR create attach use detach", func(t *testing.T) {
		g.ok(t, "SR.create", createParams(sr1, map[string]string{"device": "/dev/vda", "recovery-password_secret": secretUUID}), &cfg)
		dump := g.MustRun(t, "cryptsetup luksDump /dev/vda")
		assert.Contains(t, dump, fmt.Sprintf("Version:       \t%d", p.LUKS))
		// The recovery passphrase opens it with this cryptsetup.
		g.MustRun(t, fmt.Sprintf("cryptsetup open --test-passphrase --key-file %s /dev/vda", writeKeyFile(t, g, canary)))
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		g.assertMkfsFeatures(t, p, "/dev/mapper/luksext-"+sr1)
		g.MustRun(t, fmt.Sprintf("echo %s > %s/data.txt && sync", plaintext, sr))
		var vol smapi.Volume
		g.ok(t, "Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "disk0", "description": "", "size": 4 << 20, "sharable": false}, &vol)
		var snap smapi.Volume
		g.ok(t, "Volume.snapshot", map[string]any{"dbg": "t", "sr": sr, "key": vol.Key}, &snap)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
		assert.Equal(t, "", g.MustRun(t, "ls /dev/mapper | grep luksext || true"))
	})
	return cfg
}

func (g *guest) dom0SRStoryAfterReboot(t *testing.T, p dom0Profile, cfg map[string]string) {
	t.Run("SR attach with no secret, volumes, destroy", func(t *testing.T) {
		require.NotNil(t, cfg)
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		assert.Equal(t, plaintext+"\n", g.MustRun(t, "cat "+sr+"/data.txt"))
		var vols []smapi.Volume
		g.ok(t, "SR.ls", map[string]any{"dbg": "t", "sr": sr}, &vols)
		assert.Len(t, vols, 2, "the volume and its snapshot")
		for _, v := range vols {
			g.ok(t, "Volume.destroy", map[string]any{"dbg": "t", "sr": sr, "key": v.Key}, nil)
		}
		// SR.destroy takes the attached SR (xapi detaches after it).
		g.ok(t, "SR.destroy", map[string]any{"dbg": "t", "sr": sr}, nil)
		_, code := g.Run(t, "cryptsetup isLuks /dev/vda")
		assert.NotEqual(t, 0, code, "destroy left no LUKS header")
	})
}

// dom0Status is `luksext status SR --json` for the operator story.
func (g *guest) dom0Status(t *testing.T, sr string) (adminStatus, int) {
	t.Helper()
	r := g.luksext(t, "", "status", sr, "--json")
	var st adminStatus
	require.NoError(t, json.Unmarshal([]byte(r.Stdout), &st), r.Stdout+r.Stderr)
	require.Len(t, st.SRs, 1)
	return st, r.Exit
}

func (g *guest) dom0OperatorStory(t *testing.T, p dom0Profile) {
	const dev = "/dev/vdb"
	recoveryKey := writeNamedKey(t, g, "recovery", adminRecovery)
	rotatedKey := writeNamedKey(t, g, "rotated", adminRotated)
	opens := func(t *testing.T, key string) bool {
		_, code := g.Run(t, fmt.Sprintf("cryptsetup open --test-passphrase --key-file %s %s", key, dev))
		return code == 0
	}
	slotsOf := func(t *testing.T, kind, pin string) []int {
		st, _ := g.dom0Status(t, adminSR)
		var out []int
		for _, k := range st.SRs[0].Keyslots {
			if k.Kind == kind && (pin == "" || (k.Policy != nil && k.Policy.Pin == pin)) {
				out = append(out, k.Keyslot)
			}
		}
		return out
	}
	mustExit := func(t *testing.T, want int, stdin string, args ...string) luksextRun {
		t.Helper()
		r := g.luksext(t, stdin, args...)
		require.Equal(t, want, r.Exit, "luksext %v: %s", args, r.Stderr)
		return r
	}
	var cfg map[string]string
	t.Run("operator bind unbind", func(t *testing.T) {
		g.ok(t, "SR.create", createParams(adminSR, map[string]string{"device": dev, "tpm2-pcr-ids": "7", "recovery-password_secret": adminSecret}), &cfg)
		st, code := g.dom0Status(t, adminSR)
		require.Equal(t, 0, code)
		assert.Equal(t, p.LUKS, g.luksVersion(t, dev))
		require.Len(t, st.SRs[0].Keyslots, 2)
		mustExit(t, 0, "", "bind", adminSR, "tpm2", "{}")
		tpm := slotsOf(t, "binding", "tpm2")
		require.Len(t, tpm, 2)
		mustExit(t, 0, "", "unbind", adminSR, strconv.Itoa(tpm[1]))
		assert.Equal(t, tpm[:1], slotsOf(t, "binding", "tpm2"), "the unbound keyslot is gone")
		assert.NotContains(t, g.MustRun(t, "cryptsetup luksDump "+dev), fmt.Sprintf("Key Slot %d: ENABLED", tpm[1]))
	})
	t.Run("rebind after a PCR change", func(t *testing.T) {
		g.MustRun(t, "tpm2_pcrextend 7:sha256="+strings.Repeat("01", 32))
		g.fails(t, "SR.attach", attachParams(cfg), "Key_unavailable")
		_, code := g.dom0Status(t, adminSR)
		assert.Equal(t, 5, code)
		old := slotsOf(t, "binding", "tpm2")
		require.Len(t, old, 1)
		mustExit(t, 0, recoveryKey, "rebind", adminSR, strconv.Itoa(old[0]), "--key-file", "-")
		st, code := g.dom0Status(t, adminSR)
		assert.Equal(t, 0, code)
		assert.True(t, st.SRs[0].UnlocksAutomatically)
		assert.Len(t, st.SRs[0].Keyslots, 2, "the old binding's keyslot was removed")
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
	})
	t.Run("recovery rotate remove set", func(t *testing.T) {
		mustExit(t, 0, "", "recovery", "rotate", adminSR, "--new-key-file", rotatedKey)
		assert.True(t, opens(t, rotatedKey), "the new passphrase opens the disk")
		assert.False(t, opens(t, recoveryKey), "the old one no longer does")
		mustExit(t, 7, "", "recovery", "remove", adminSR)
		mustExit(t, 0, "", "bind", adminSR, "tpm2", "{}")
		mustExit(t, 0, "", "recovery", "remove", adminSR)
		assert.False(t, opens(t, rotatedKey))
		assert.Empty(t, slotsOf(t, "passphrase", ""))
		mustExit(t, 0, "", "recovery", "set", adminSR, "--new-key-file", recoveryKey)
		assert.True(t, opens(t, recoveryKey))
	})
	t.Run("kill -9 during a key removal converges", func(t *testing.T) {
		// Rotate adds the new passphrase, proves it, then removes the old
		// keyslot. Killed right when the new keyslot opens (the removal is
		// next; one round, to keep the matrix within its CI budget): a way
		// in remains, and the next run converges on exactly one passphrase
		// keyslot.
		newKey, oldKey := rotatedKey, recoveryKey
		wait := "for i in $(seq 3000); do cryptsetup open --test-passphrase --key-file " + newKey + " " + dev + " 2>/dev/null && break; sleep 0.01; done"
		out := g.MustRun(t, fmt.Sprintf(`setsid %s/root/usr/sbin/luksext recovery rotate %s --new-key-file %s >/dev/null 2>>%s/luksext-killed.err &
pid=$!; %s; kill -9 $pid 2>/dev/null && echo killed || echo finished; wait $pid 2>/dev/null; true`, g.work, adminSR, newKey, g.work, wait))
		t.Logf("rotate: %s", strings.TrimSpace(out))
		st, _ := g.dom0Status(t, adminSR)
		assert.True(t, opens(t, oldKey) || opens(t, newKey) || st.SRs[0].UnlocksAutomatically, "a way in after the kill")
		mustExit(t, 0, "", "recovery", "rotate", adminSR, "--new-key-file", newKey)
		assert.True(t, opens(t, newKey))
		assert.False(t, opens(t, oldKey))
		assert.Len(t, slotsOf(t, "passphrase", ""), 1, "no orphan passphrase keyslot")
	})
	t.Run("header backup restore", func(t *testing.T) {
		// On the guest's own filesystem, as an administrator keeps it:
		// cryptsetup 2.0.3's luksHeaderRestore fails to open a backup file
		// on the 9p work share (with and without direct-io; 1.7.4 and
		// 2.6.1 read it there), which says nothing about a host.
		backup := "/root/header.bak"
		g.MustRun(t, "rm -f "+backup)
		mustExit(t, 0, "", "header-backup", adminSR, backup)
		before := slotsOf(t, "binding", "tpm2")
		require.Len(t, before, 2)
		mustExit(t, 0, "", "unbind", adminSR, strconv.Itoa(before[1]))
		require.Len(t, slotsOf(t, "binding", "tpm2"), 1)
		mustExit(t, 0, "", "header-restore", adminSR, backup, "--yes")
		st, code := g.dom0Status(t, adminSR)
		assert.Equal(t, 0, code)
		assert.Equal(t, before, slotsOf(t, "binding", "tpm2"), "both bindings are back: %+v", st)
		for _, k := range st.SRs[0].Keyslots {
			if k.Kind == "binding" {
				require.NotNil(t, k.Unseals, "%+v", k)
				assert.True(t, *k.Unseals, "keyslot %d unseals after the restore: %s", k.Keyslot, k.Error)
			}
		}
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
	})
}

func (g *guest) luksVersion(t *testing.T, dev string) int {
	out := g.MustRun(t, "cryptsetup luksDump "+dev+" | sed -n 's/^Version:[[:space:]]*//p'")
	v, err := strconv.Atoi(strings.TrimSpace(out))
	require.NoError(t, err, out)
	return v
}

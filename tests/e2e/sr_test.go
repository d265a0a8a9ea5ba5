package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/tests/datapath"
	"github.com/luksext/luksext/tests/vm"
)

const (
	canary      = "CANARY-recovery-9f3b2c71-passphrase"
	wrongSecret = "WRONG-recovery-passphrase-000"
	plaintext   = "PLAINTEXT-MARKER-luksext-e2e-7d41"
	sr1         = "6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11"
	sr2         = "0b9e2a44-8c55-4d1e-a3f0-5b7c9d2e1f60"
	sr3         = "a1d4c7e0-2f3b-4c5d-8e9f-0a1b2c3d4e5f"
	secretUUID  = "5d5e0c1a-1111-4222-8333-944455556666"
	secret2UUID = "5d5e0c1a-1111-4222-8333-944455550002"
	wrongUUID   = "5d5e0c1a-1111-4222-8333-000000000000"
)

// TestSRLifecycle is the whole story on one guest, across three boots:
// create → use → detach → reboot → attach with no secret (TPM) → the data
// is intact and the raw disk holds only ciphertext; PCR policy mismatch
// with and without the recovery fallback; a different TPM stays locked;
// refusals (non-blank, missing device, another SR's disk); idempotency;
// kill -9 in the middle of SR.create and a converging rerun; destroy; and
// a canary recovery passphrase that must never leak.
func TestSRLifecycle(t *testing.T) {
	g := bootGuest(t, vm.Config{Disks: []int64{48 << 20, 40 << 20, 40 << 20}, TPM: true})
	g.startXAPI(t, map[string]string{secretUUID: canary, secret2UUID: canary, wrongUUID: wrongSecret})
	// Snapshot every process's argv while the plugins run, for the canary check.
	g.MustRun(t, fmt.Sprintf(`setsid bash -c 'while :; do cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\0" " " >>%s/cmdlines.log; echo >>%s/cmdlines.log; sleep 0.05; done' >/dev/null 2>&1 &`, g.work, g.work))

	disk0 := "/dev/disk/by-id/virtio-luksext-disk0"
	var cfg1, cfg2 map[string]string

	t.Run("refusals", func(t *testing.T) {
		g.MustRun(t, "mkfs.ext4 -q -L userdata /dev/vdb && blkid -o value -s TYPE /dev/vdb")
		rec := g.fails(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vdb"}), "Device_not_blank")
		assert.Contains(t, rec.Params[1], "ext4")
		assert.Contains(t, rec.Params[1], "force")
		assert.Equal(t, "ext4\n", g.MustRun(t, "blkid -o value -s TYPE /dev/vdb"), "the refused disk lost nothing")
		g.fails(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vdz"}), "Device_not_found")
		g.fails(t, "SR.create", createParams(sr2, map[string]string{}), "Invalid_configuration")
		g.fails(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vdb", "tpm2-pcr-ids": "7,99"}), "Invalid_configuration")
		g.fails(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vdb", "tang-url": "http://127.0.0.1:1"}), "Invalid_configuration")
		g.fails(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vdb", "force": "true",
			"recovery-password_secret": "00000000-0000-4000-8000-000000000000"}), "Invalid_configuration")
		assert.Equal(t, "ext4\n", g.MustRun(t, "blkid -o value -s TYPE /dev/vdb"))
	})

	t.Run("create", func(t *testing.T) {
		g.ok(t, "SR.create", createParams(sr1, map[string]string{"device": "/dev/vda", "recovery-password_secret": secretUUID}), &cfg1)
		assert.Equal(t, map[string]string{"device": disk0, "sr_uuid": sr1, "luks-uuid": cfg1["luks-uuid"]}, cfg1,
			"the configuration replaces the PBD's device-config: stable path, uuids, no secret")
		assert.NotEmpty(t, cfg1["luks-uuid"])
		calls, err := os.ReadFile(filepath.Join(g.work, "xapi-calls.log"))
		require.NoError(t, err)
		assert.Contains(t, string(calls), "secret.destroy", "the recovery passphrase is not kept in xapi")
		dump := g.MustRun(t, "cryptsetup luksDump /dev/vda")
		assert.Contains(t, dump, "Version:       \t2")
		assert.Contains(t, dump, "sector: 512")
		assert.Contains(t, dump, "clevis")
		assert.Contains(t, dump, "luksext-"+sr1)

		var again map[string]string
		g.ok(t, "SR.create", createParams(sr1, map[string]string{"device": "/dev/vda"}), &again)
		assert.Equal(t, cfg1, again, "a repeated SR.create converges on the same SR")
		rec := g.fails(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vda"}), "Device_not_blank")
		assert.Contains(t, rec.Params[1], sr1)

		// Second SR: sealed to PCR 7, recovery passphrase kept for the fallback.
		g.ok(t, "SR.create", createParams(sr2, map[string]string{"device": "/dev/vdb", "force": "true",
			"tpm2-pcr-ids": "7", "recovery-password_secret": secret2UUID, "recovery-fallback": "true"}), &cfg2)
		assert.Equal(t, "7", cfg2["tpm2-pcr-ids"])
		assert.Equal(t, secret2UUID, cfg2["recovery-password_secret"], "kept: the administrator opted in to the fallback")
	})

	mnt1 := "/var/run/sr-mount/" + sr1
	t.Run("attach-use-detach", func(t *testing.T) {
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg1), &sr)
		assert.Equal(t, mnt1, sr)
		g.ok(t, "SR.attach", attachParams(cfg1), &sr)
		assert.Equal(t, mnt1, sr, "attach twice: same answer")
		var st smapi.SRStat
		g.ok(t, "SR.stat", map[string]any{"dbg": "t", "sr": sr}, &st)
		assert.Equal(t, "Encrypted SR", st.Name)
		assert.Greater(t, st.TotalSpace, int64(10<<20))
		g.ok(t, "SR.set_name", map[string]any{"dbg": "t", "sr": sr, "new_name": "Renamed SR"}, nil)
		g.MustRun(t, fmt.Sprintf(`yes %s | head -n 2000 > %s/data.txt; sha256sum %s/data.txt > %s/data.sum; sync`, plaintext, mnt1, mnt1, g.work))

		// A VM disk on the SR, written through the datapath (tap-ctl is the
		// fake that serves the VHD over nbd, keeping tap-ctl's contract).
		dp := datapath.Install(t, g.Machine)
		var vol smapi.Volume
		g.ok(t, "Volume.create", map[string]any{"dbg": "t", "sr": sr, "name": "disk0", "description": "", "size": 4 << 20, "sharable": false}, &vol)
		require.Len(t, vol.URI, 1)
		dev := dpAttach(t, dp, vol.URI[0], "7")
		g.MustRun(t, fmt.Sprintf(`yes %s | head -c 1048576 > %s/pattern
dd if=%s/pattern of=%s bs=64k oflag=direct status=none && sync`, plaintext, g.work, g.work, dev))
		rec := g.fails(t, "SR.destroy", map[string]any{"dbg": "t", "sr": sr}, "In_use")
		assert.Contains(t, rec.Params[1], vol.Key)
		dpDetach(t, dp, vol.URI[0], "7")
		dev = dpAttach(t, dp, vol.URI[0], "9")
		g.MustRun(t, fmt.Sprintf(`cmp <(head -c 1048576 %s) %s/pattern`, dev, g.work))
		dpDetach(t, dp, vol.URI[0], "9")
		// Issue 13 item 2: an SR record naming another LUKS disk (SR 2's)
		// never gets that disk crypto-erased by SR.destroy.
		g.MustRun(t, fmt.Sprintf(`cp %s/luksext-sr.json %s/sr.json.orig
sed -i 's#"device": "[^"]*"#"device": "/dev/vdb"#; s#"luks_uuid": "[^"]*"#"luks_uuid": "%s"#' %s/luksext-sr.json`, mnt1, g.work, cfg2["luks-uuid"], mnt1))
		rec = g.fails(t, "SR.destroy", map[string]any{"dbg": "t", "sr": sr}, "Needs_attention")
		assert.Contains(t, rec.Params[1], fmt.Sprintf("belongs to SR %q", sr2))
		g.MustRun(t, fmt.Sprintf("cryptsetup isLuks /dev/vdb && cryptsetup luksDump /dev/vdb | grep -q 'luksext-%s' && cp %s/sr.json.orig %s/luksext-sr.json", sr2, g.work, mnt1))
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
		assert.Equal(t, "", g.MustRun(t, "ls /dev/mapper 2>/dev/null | grep luksext || true"), "detach closed the mapping")
		g.fails(t, "SR.stat", map[string]any{"dbg": "t", "sr": sr}, "Sr_not_attached")
		// The recovery passphrase opens it with plain cryptsetup.
		g.MustRun(t, fmt.Sprintf("cryptsetup open --test-passphrase --key-file %s /dev/vda", writeKeyFile(t, g, canary)))
	})

	t.Run("kill -9 during create, rerun converges", func(t *testing.T) {
		out := g.MustRun(t, fmt.Sprintf(`export LUKSEXT_XAPI_SOCKET=/run/fakexapi.sock
echo '{"dbg":"t","uuid":"%s","configuration":{"device":"/dev/vdc"},"name":"n","description":""}' > %s/p3.json
%s/SR.create --json <%s/p3.json >/dev/null 2>>%s/plugin-stderr.log &
pid=$!
for i in $(seq 3000); do cryptsetup isLuks /dev/vdc 2>/dev/null && break; sleep 0.01; done
kill -9 $pid; wait $pid 2>/dev/null
cryptsetup luksDump /dev/vdc >/dev/null 2>&1 && echo "header-written" || echo "no-header"`, sr3, g.work, g.volume, g.work, g.work))
		t.Logf("killed SR.create: %s", strings.TrimSpace(out))
		var st smapi.SRStat
		var cfg3 map[string]string
		g.ok(t, "SR.create", createParams(sr3, map[string]string{"device": "/dev/vdc"}), &cfg3)
		slots := g.MustRun(t, `cryptsetup luksDump /dev/vdc | grep -cE '^  [0-9]+: luks2'`)
		assert.Equal(t, "1\n", slots, "exactly the TPM keyslot: no orphan keyslot from the killed run")
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg3), &sr)
		g.ok(t, "SR.stat", map[string]any{"dbg": "t", "sr": sr}, &st)
		g.ok(t, "SR.destroy", map[string]any{"dbg": "t", "sr": sr}, nil)
		_, code := g.Run(t, "cryptsetup luksDump /dev/vdc")
		assert.NotEqual(t, 0, code, "destroy left no LUKS header")
		assert.Equal(t, "0\n", g.MustRun(t, `(cryptsetup luksDump /dev/vdc 2>/dev/null | grep -c luks2) || true`))
	})

	g.Reboot(t)
	t.Run("after reboot: attach with no secret, data intact", func(t *testing.T) {
		var sr string
		g.ok(t, "SR.attach", attachParams(cfg1), &sr)
		g.MustRun(t, fmt.Sprintf("sha256sum -c %s/data.sum", g.work))
		var st smapi.SRStat
		g.ok(t, "SR.stat", map[string]any{"dbg": "t", "sr": sr}, &st)
		assert.Equal(t, "Renamed SR", st.Name)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
	})

	t.Run("probe", func(t *testing.T) {
		var res []smapi.ProbeResult
		g.ok(t, "SR.probe", map[string]any{"dbg": "t", "configuration": map[string]string{"device": "/dev/vda"}}, &res)
		require.Len(t, res, 1)
		assert.True(t, res[0].Complete)
		assert.Equal(t, sr1, res[0].Configuration["sr_uuid"])
		assert.Equal(t, cfg1["luks-uuid"], res[0].Configuration["luks-uuid"])
		assert.Equal(t, disk0, res[0].Configuration["device"])
		require.NotNil(t, res[0].SR)

		g.ok(t, "SR.probe", map[string]any{"dbg": "t", "configuration": map[string]string{}}, &res)
		found := map[string]bool{}
		for _, r := range res {
			found[r.Configuration["sr_uuid"]] = true
			if r.Configuration["device"] == "/dev/disk/by-id/virtio-luksext-disk2" {
				assert.False(t, r.Complete, "a destroyed SR's disk is a candidate, not an SR")
			}
		}
		assert.True(t, found[sr1] && found[sr2], "every luksext SR on the host is found: %+v", res)
	})

	t.Run("PCR 7 changed", func(t *testing.T) {
		g.MustRun(t, "tpm2_pcrextend 7:sha256=0000000000000000000000000000000000000000000000000000000000000001")
		noFallback := map[string]string{}
		for k, v := range cfg2 {
			if !strings.HasPrefix(k, "recovery") {
				noFallback[k] = v
			}
		}
		rec := g.fails(t, "SR.attach", attachParams(noFallback), "Key_unavailable")
		assert.Contains(t, rec.Params[1], "PCR")
		assert.Contains(t, rec.Params[1], "luksext unlock")
		assert.Equal(t, "", g.MustRun(t, "ls /dev/mapper 2>/dev/null | grep luksext || true"), "stays locked")

		wrong := map[string]string{}
		for k, v := range cfg2 {
			wrong[k] = v
		}
		wrong["recovery-password_secret"] = wrongUUID
		g.startXAPI(t, map[string]string{secret2UUID: canary, wrongUUID: wrongSecret})
		rec = g.fails(t, "SR.attach", attachParams(wrong), "Key_unavailable")
		assert.Contains(t, rec.Params[1], "recovery passphrase")

		var sr string
		g.ok(t, "SR.attach", attachParams(cfg2), &sr)
		assert.Contains(t, g.MustRun(t, fmt.Sprintf("cat %s/plugin-stderr.log", g.work)), "unlocked with the recovery passphrase")
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
	})

	g.ReplaceTPM(t)
	g.Reboot(t)
	t.Run("another TPM: stays locked", func(t *testing.T) {
		rec := g.fails(t, "SR.attach", attachParams(cfg1), "Key_unavailable")
		assert.Contains(t, rec.Params[1], "tpm2")
		assert.Equal(t, "", g.MustRun(t, "ls /dev/mapper 2>/dev/null | grep luksext || true"))
	})

	t.Run("no plaintext and no canary outside the LUKS header", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			raw, err := os.ReadFile(g.DiskPath(i))
			require.NoError(t, err)
			assert.False(t, bytes.Contains(raw, []byte(plaintext)), "disk %d holds plaintext", i)
			assert.False(t, bytes.Contains(raw, []byte(canary)), "disk %d holds the recovery passphrase", i)
		}
		// The pattern comes from a file, so no script we send holds it.
		pattern := writeKeyFile(t, g, canary)
		leaks := g.MustRun(t, fmt.Sprintf(`grep -rlsF --exclude=input-secrets --exclude='keyfile-*' -f %s /var/log /run /tmp %s 2>/dev/null || true`, pattern, g.work))
		assert.Equal(t, "", strings.TrimSpace(leaks), "the canary leaked into these files")
	})
}

// dpAttach attaches and activates a volume for domain through the datapath
// plugin and returns the block device it serves.
func dpAttach(t *testing.T, dp *datapath.Guest, uri, domain string) string {
	t.Helper()
	p := map[string]string{"dbg": "t", "uri": uri, "domain": domain}
	r, err := smapitest.Call(context.Background(), dp, "Datapath.attach", p)
	require.NoError(t, err)
	require.Equal(t, 0, r.ExitCode, "Datapath.attach: %s %s", r.Stdout, r.Stderr)
	var b smapi.Backend
	require.NoError(t, json.Unmarshal(r.Stdout, &b))
	require.Len(t, b.Implementations, 2)
	require.Equal(t, "vbd3", b.Implementations[0].XenDisk.BackendType)
	r, err = smapitest.Call(context.Background(), dp, "Datapath.activate", p)
	require.NoError(t, err)
	require.Equal(t, 0, r.ExitCode, "Datapath.activate: %s %s", r.Stdout, r.Stderr)
	return b.Implementations[1].BlockDevice.Path
}

// dpDetach deactivates and detaches a volume for domain.
func dpDetach(t *testing.T, dp *datapath.Guest, uri, domain string) {
	t.Helper()
	for _, m := range []string{"Datapath.deactivate", "Datapath.detach"} {
		r, err := smapitest.Call(context.Background(), dp, m, map[string]string{"dbg": "t", "uri": uri, "domain": domain})
		require.NoError(t, err)
		require.Equal(t, 0, r.ExitCode, "%s: %s %s", m, r.Stdout, r.Stderr)
	}
}

func createParams(uuid string, cfg map[string]string) map[string]any {
	return map[string]any{"dbg": "t", "uuid": uuid, "configuration": cfg, "name": "Encrypted SR", "description": "e2e"}
}

func attachParams(cfg map[string]string) map[string]any {
	return map[string]any{"dbg": "t", "configuration": cfg}
}

// writeKeyFile puts a passphrase where the guest's cryptsetup can read it
// (the test's own input; excluded from the canary scan).
func writeKeyFile(t *testing.T, g *guest, pass string) string {
	p := filepath.Join(g.work, "keyfile-"+fmt.Sprint(len(pass)))
	require.NoError(t, os.WriteFile(p, []byte(pass), 0o600))
	return p
}

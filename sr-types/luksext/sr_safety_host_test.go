package luksext_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
)

// loopDev attaches a fresh sparse file of size bytes as a loop device.
func loopDev(t *testing.T, size int64) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(f, nil, 0o600))
	require.NoError(t, os.Truncate(f, size))
	out, err := exec.Command("losetup", "-f", "--show", f).CombinedOutput()
	if err != nil {
		testenv.Unavailable(t, "no loop device: "+strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func mountExt4(t *testing.T, dev, dir string) {
	t.Helper()
	out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.NoError(t, os.MkdirAll(dir, 0o700))
	out, err = exec.Command("mount", dev, dir).CombinedOutput()
	if err != nil {
		testenv.Unavailable(t, "cannot mount a loop device here: "+strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
}

// sealAnything stands in for the TPM: these tests are about what happens
// to the disk, and SR.create seals before its first write to it. Decrypt
// is never reached (the calls are refused before any unlock).
type sealAnything struct{}

func (sealAnything) Encrypt(context.Context, clevis.Config, secret.Bytes) (string, error) {
	return "sealed", nil
}

func (sealAnything) Decrypt(context.Context, string) (secret.Bytes, error) {
	return secret.Bytes{}, errors.New("sealAnything cannot unseal")
}

type hostSR struct {
	ctx                 *smapitest.Ctx
	mountRoot, stateDir string
}

func newHostSR(t *testing.T) hostSR {
	testenv.Root(t)
	testenv.Tools(t, "losetup", "mkfs.ext4", "mount", "umount", "cryptsetup")
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	runner := run.NewExec(log)
	dir := t.TempDir()
	d := luksext.SRDeps{LUKS: luks.New(runner, log), FS: fs.New(runner), Probe: blockdev.Prober{Run: runner}, Keys: sealAnything{},
		MountRoot: filepath.Join(dir, "sr-mount"), StateDir: filepath.Join(dir, "state")}
	table := luksext.VolumeTable(luksext.Deps{Paths: run.DefaultPaths, SR: d, Volumes: luksext.VolumeDeps{Handles: luksext.SRCheck{MountRoot: d.MountRoot, StateDir: d.StateDir}}})
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: log}}
	return hostSR{ctx: &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}, mountRoot: d.MountRoot, stateDir: d.StateDir}
}

// Issue 13 item 1: SR.create with force=true on a mounted device zeroed
// its first 16 MiB and last 1 MiB before cryptsetup refused the busy
// device. It is refused as In_use before any write.
func TestSRCreateForceRefusesMountedDevice(t *testing.T) {
	h := newHostSR(t)
	dev := loopDev(t, 64<<20)
	mnt := filepath.Join(t.TempDir(), "mnt")
	mountExt4(t, dev, mnt)
	require.NoError(t, os.WriteFile(filepath.Join(mnt, "precious"), []byte("data"), 0o600))
	exec.Command("sync").Run()
	before, err := blockdev.ProbeMagic(dev)
	require.NoError(t, err)
	require.NotEmpty(t, before)

	rec := h.ctx.ExpectError("SR.create", map[string]any{"dbg": "t", "uuid": store.NewID(), "name": "n", "description": "",
		"configuration": map[string]string{"device": dev, "force": "true"}}, "In_use")
	if rec != nil {
		assert.Contains(t, rec.Params[1], "in use")
	}
	after, err := blockdev.ProbeMagic(dev)
	require.NoError(t, err)
	assert.Equal(t, before, after, "the mounted filesystem's signature is intact")
	exec.Command("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches").Run()
	b, err := os.ReadFile(filepath.Join(mnt, "precious"))
	require.NoError(t, err)
	assert.Equal(t, "data", string(b))
	assert.ErrorIs(t, blockdev.Wipe(dev), blockdev.ErrInUse, "the wipe itself refuses a busy device")
}

// Issue 13 item 2: SR.destroy crypto-erased whatever disk the
// luksext-sr.json at the SR's mountpoint named. A mount that is not the
// SR's mapping, holding a record naming another LUKS disk, is refused and
// that disk keeps its header.
func TestSRDestroyRefusesARecordNamingAnotherDisk(t *testing.T) {
	h := newHostSR(t)
	srUUID := store.NewID()
	other := loopDev(t, 32<<20)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	lm := luks.New(run.NewExec(log), log)
	pass := secret.FromString("other-disk-passphrase")
	otherUUID := store.NewID()
	_, err := lm.Format(context.Background(), other, luks.FormatOptions{UUID: otherUUID, Label: luks.SRName(srUUID), Passphrase: pass, Keyslot: 0, KDF: luks.MinimalKDF(), Force: true})
	require.NoError(t, err)

	mnt := filepath.Join(h.mountRoot, srUUID)
	mountExt4(t, loopDev(t, 32<<20), mnt)
	b, _ := json.Marshal(luksext.SRMeta{Schema: 1, UUID: srUUID, Name: "x", LUKSUUID: otherUUID, Device: other})
	require.NoError(t, os.WriteFile(filepath.Join(mnt, luksext.SRMetaFile), b, 0o600))

	rec := h.ctx.ExpectError("SR.destroy", map[string]any{"dbg": "t", "sr": mnt}, "Needs_attention")
	if rec != nil {
		assert.Contains(t, rec.Params[1], "luksext-"+srUUID)
	}
	info, err := lm.Inspect(other)
	require.NoError(t, err, "the other disk still has its LUKS header")
	assert.Equal(t, otherUUID, info.UUID)
	assert.NotEmpty(t, info.Keyslots)
}

// Issue 13 item 8: SR.detach followed a symlinked mountpoint and unmounted
// its target.
func TestSRDetachRefusesSymlinkedMountpoint(t *testing.T) {
	h := newHostSR(t)
	target := filepath.Join(t.TempDir(), "elsewhere")
	mountExt4(t, loopDev(t, 32<<20), target)
	srUUID := store.NewID()
	require.NoError(t, os.MkdirAll(h.mountRoot, 0o700))
	link := filepath.Join(h.mountRoot, srUUID)
	require.NoError(t, os.Symlink(target, link))
	h.ctx.ExpectError("SR.detach", map[string]any{"dbg": "t", "sr": link}, "Needs_attention")
	_, mounted, err := fs.New(nil).MountedAt(target)
	require.NoError(t, err)
	assert.True(t, mounted, "the symlink's target is still mounted")
}

// Issue 13 item 16: volume images were 0644 in a 0755 mountpoint, so every
// dom0 user could read decrypted VM disks. The mounted SR root is 0700 and
// what the plugin writes there is 0600.
func TestMountedSRIsRootOnly(t *testing.T) {
	h := newHostSR(t)
	dev := loopDev(t, 32<<20)
	out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput()
	require.NoError(t, err, "%s", out)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	f := fs.New(run.NewExec(log))
	srUUID := store.NewID()
	mnt := filepath.Join(h.mountRoot, srUUID)
	require.NoError(t, f.Mount(context.Background(), dev, mnt))
	t.Cleanup(func() { _ = exec.Command("umount", mnt).Run() })
	st, err := os.Stat(mnt)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm(), "the SR root")
	st, err = os.Stat(h.mountRoot)
	require.NoError(t, err)
	assert.Zero(t, st.Mode().Perm()&0o077, "the mount root")

}

package luksext_test

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/luksexttest"
)

func handleCtx(t *testing.T, d luksext.VolumeDeps) *smapitest.Ctx {
	table := luksext.VolumeTable(luksext.Deps{Volumes: d})
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	return &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
}

func createParams(sr string) map[string]any {
	return map[string]any{"dbg": "t", "sr": sr, "name": "a", "description": "", "size": 1 << 20, "sharable": false}
}

// entries lists what is under dir, recursively.
func entries(t *testing.T, dir string) []string {
	var out []string
	require.NoError(t, filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err == nil && p != dir {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return err
	}))
	return out
}

// Issue 13 item 7: any directory holding a luksext-sr.json, or a symlink
// under the mount root, was accepted as an SR by Volume.create, SR.ls and
// SR.stat. Only <mount root>/<uuid>, a real directory mounted from
// luksext-<uuid>, is.
func TestSRHandleIsChecked(t *testing.T) {
	r := luksexttest.NewRoot(t)
	good := r.NewSR(t)
	c := handleCtx(t, luksext.VolumeDeps{Handles: r.Check})
	c.MustSucceed("SR.ls", map[string]any{"dbg": "t", "sr": good.Path}, nil)

	// a directory that merely holds an SR record
	stray := filepath.Join(t.TempDir(), good.UUID)
	require.NoError(t, os.MkdirAll(stray, 0o700))
	b, _ := os.ReadFile(filepath.Join(good.Path, luksext.SRMetaFile))
	require.NoError(t, os.WriteFile(filepath.Join(stray, luksext.SRMetaFile), b, 0o600))
	// a symlink under the mount root to it
	link := filepath.Join(r.Check.MountRoot, store.NewID())
	require.NoError(t, os.Symlink(stray, link))
	// a mounted SR whose source is not its mapping
	wrongSrc := r.NewSR(t)
	wrongSrc.Mount(t, "/dev/sdz1")
	// an SR record naming another SR
	otherRec := r.NewSR(t)
	require.NoError(t, os.WriteFile(filepath.Join(otherRec.Path, luksext.SRMetaFile), b, 0o600))

	for _, sr := range []string{stray, link, wrongSrc.Path, otherRec.Path, "/etc", good.Path + "/..", "relative/" + good.UUID} {
		for _, m := range []string{"SR.ls", "Volume.create"} {
			p := map[string]any{"dbg": "t", "sr": sr}
			if m == "Volume.create" {
				p = createParams(sr)
			}
			res, rec := c.Call(m, p)
			require.NotZero(t, res.ExitCode, "%s %s succeeded", m, sr)
			require.NotNil(t, rec)
			assert.Contains(t, []string{"Sr_not_attached", "Needs_attention"}, rec.Params[0], "%s %s: %v", m, sr, rec.Params)
		}
	}
	assert.Equal(t, []string{luksext.SRMetaFile}, entries(t, stray), "nothing written through the stray handle")
}

// Issue 13 item 3: Volume.create racing SR.detach landed the volume and its
// record unencrypted under the just-unmounted mountpoint. The handle is
// checked under the lock SR.detach holds, and nothing recreates the SR's
// directories.
func TestVolumeCreateRacingDetachWritesNothing(t *testing.T) {
	r := luksexttest.NewRoot(t)
	s := r.NewSR(t)
	c := handleCtx(t, luksext.VolumeDeps{Handles: r.Check, LockTimeout: 20 * time.Second})
	// SR.detach holds <state>/<uuid>.lock exclusively while it unmounts
	require.NoError(t, os.MkdirAll(r.Check.StateDir, 0o700))
	l, ok, err := lock.TryAcquire(filepath.Join(r.Check.StateDir, s.UUID+".lock"), lock.Exclusive)
	require.NoError(t, err)
	require.True(t, ok)
	done := make(chan *smapi.ErrorRecord, 1)
	go func() {
		done <- c.ExpectError("Volume.create", createParams(s.Path), "Sr_not_attached")
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case <-done:
		t.Fatal("Volume.create did not wait for SR.detach")
	default:
	}
	s.Unmount(t) // the filesystem is gone; the bare mountpoint stays
	require.NoError(t, l.Release())
	<-done
	assert.Equal(t, []string{luksext.SRMetaFile}, entries(t, s.Path), "nothing landed under the unmounted mountpoint")

	// Same without the race: an SR whose directory still has its old
	// store tree but nothing mounted.
	s2 := r.NewSR(t)
	c.MustSucceed("Volume.create", createParams(s2.Path), nil)
	before := entries(t, s2.Path)
	s2.Unmount(t)
	c.ExpectError("Volume.create", createParams(s2.Path), "Sr_not_attached")
	assert.Equal(t, before, entries(t, s2.Path))
}

// Issue 13 item 6: Volume.destroy with another spelling of the SR path
// (/run/sr-mount/<uuid> for /var/run/sr-mount/<uuid>) deleted a volume a VM
// had attached. The handle is canonical whatever the spelling, so the
// in-use check sees the path the datapath recorded.
func TestVolumeDestroyWithAliasedSRPathSeesAttachment(t *testing.T) {
	r := luksexttest.NewRoot(t)
	s := r.NewSR(t)
	alias := filepath.Join(t.TempDir(), "run-sr-mount")
	require.NoError(t, os.Symlink(r.Check.MountRoot, alias)) // /run/sr-mount -> the mount root
	var asked []string
	var attachedPath string
	c := handleCtx(t, luksext.VolumeDeps{Handles: r.Check, InUse: func(dir string) ([]string, error) {
		asked = append(asked, dir)
		if filepath.Dir(attachedPath) == dir { // the datapath's text comparison
			return []string{filepath.Base(attachedPath)}, nil
		}
		return nil, nil
	}})
	var v smapi.Volume
	c.MustSucceed("Volume.create", createParams(s.Path), &v)
	attachedPath = filepath.Join(s.Path, v.Key+".vhd") // the URI the VM was given
	aliased := filepath.Join(alias, s.UUID)
	c.ExpectError("Volume.destroy", map[string]any{"dbg": "t", "sr": aliased, "key": v.Key}, "In_use")
	c.MustSucceed("Volume.stat", map[string]any{"dbg": "t", "sr": aliased, "key": v.Key}, &v)
	assert.Equal(t, luksext.VolumeURI(attachedPath), v.URI[0], "URIs name the canonical path")
	assert.FileExists(t, attachedPath)
}

// Issue 13 item 4: journal ids (base, new) were not checked; a crafted
// snapshot journal renamed the leaf to a path outside the SR.
func TestHostileSnapshotJournalIsRefused(t *testing.T) {
	r := luksexttest.NewRoot(t)
	s := r.NewSR(t)
	c := handleCtx(t, luksext.VolumeDeps{Handles: r.Check})
	var v smapi.Volume
	c.MustSucceed("Volume.create", createParams(s.Path), &v)
	outside := t.TempDir()
	j, _ := json.Marshal(map[string]any{"vdi": v.Key, "base": "../../../../../../.." + outside + "/x", "new": store.NewID()})
	jdir := filepath.Join(s.Path, store.MetaDir, "journal")
	require.NoError(t, os.MkdirAll(jdir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(jdir, "snapshot-"+v.Key+".json"), j, 0o600))
	rec := c.ExpectError("Volume.create", createParams(s.Path), "Needs_attention")
	assert.Contains(t, rec.Params[1], "snapshot-"+v.Key+".json", "the error names the file")
	assert.Empty(t, entries(t, outside))
	assert.FileExists(t, filepath.Join(s.Path, v.Key+".vhd"))

	// and a record whose format walks out of the SR
	require.NoError(t, os.Remove(filepath.Join(jdir, "snapshot-"+v.Key+".json")))
	victim := filepath.Join(outside, "victim.vhd")
	require.NoError(t, os.WriteFile(victim, []byte("x"), 0o600))
	rel, _ := filepath.Rel(s.Path, victim)
	recPath := filepath.Join(s.Path, store.MetaDir, "nodes", v.Key+".json")
	rb, err := os.ReadFile(recPath)
	require.NoError(t, err)
	var n map[string]any
	require.NoError(t, json.Unmarshal(rb, &n))
	n["format"] = "vhd/../" + rel // <key>.vhd/../<rel> is the victim
	rb, _ = json.Marshal(n)
	require.NoError(t, os.WriteFile(recPath, rb, 0o600))
	rec = c.ExpectError("Volume.destroy", map[string]any{"dbg": "t", "sr": s.Path, "key": v.Key}, "Needs_attention")
	assert.Contains(t, rec.Params[1], v.Key+".json")
	assert.FileExists(t, victim)
	c.ExpectError("Volume.stat", map[string]any{"dbg": "t", "sr": s.Path, "key": v.Key}, "Needs_attention")
}

// Issue 13 item 15: SR.probe reported /etc/passwd, a directory and
// /dev/null as "blank: SR.create will use it". Only block devices are
// candidates; anything else is refused with a reason.
func TestSRProbeOffersOnlyBlockDevices(t *testing.T) {
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	runner := run.NewExec(log)
	table := luksext.VolumeTable(luksext.Deps{SR: luksext.SRDeps{LUKS: luks.New(runner, log), Probe: blockdev.Prober{Run: runner}}})
	x := smapitest.InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify}}
	c := &smapitest.Ctx{T: t, Cfg: smapitest.Config{Invoker: x, Table: table}}
	for _, dev := range []string{"/etc/passwd", t.TempDir(), "/dev/null"} {
		res, rec := c.Call("SR.probe", map[string]any{"dbg": "t", "configuration": map[string]string{"device": dev}})
		if res.ExitCode == 0 {
			t.Errorf("SR.probe accepted %s: %s", dev, res.Stdout)
			continue
		}
		require.NotNil(t, rec)
		assert.Equal(t, "Invalid_configuration", rec.Params[0], dev)
		assert.Contains(t, rec.Params[1], "not a block device")
	}
}

// Issue 13 item 5 through the SR type: a volume whose VHD header claims a
// 0xFFFFFFFF-entry BAT (valid checksum) made Volume.resize allocate and
// read 16 GiB. It is Needs_attention naming the file, at once.
func TestVolumeResizeOfHostileVHDNeedsAttention(t *testing.T) {
	r := luksexttest.NewRoot(t)
	s := r.NewSR(t)
	c := handleCtx(t, luksext.VolumeDeps{Handles: r.Check})
	var v smapi.Volume
	c.MustSucceed("Volume.create", createParams(s.Path), &v)
	img := filepath.Join(s.Path, v.Key+".vhd")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	require.NoError(t, err)
	hdr := make([]byte, 1024)
	_, err = f.ReadAt(hdr, 512) // dd_hdr right after the footer copy
	require.NoError(t, err)
	require.Equal(t, "cxsparse", string(hdr[:8]))
	binary.BigEndian.PutUint32(hdr[28:], 0xFFFFFFFF) // max_bat_size
	binary.BigEndian.PutUint32(hdr[36:], 0)
	var sum uint32
	for _, b := range hdr {
		sum += uint32(b)
	}
	binary.BigEndian.PutUint32(hdr[36:], ^sum)
	_, err = f.WriteAt(hdr, 512)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(17<<30)) // sparse: every read of the BAT would succeed
	require.NoError(t, f.Close())
	start := time.Now()
	rec := c.ExpectError("Volume.resize", map[string]any{"dbg": "t", "sr": s.Path, "key": v.Key, "new_size": 4 << 20}, "Needs_attention")
	if rec != nil {
		assert.Contains(t, rec.Params[1], img)
	}
	assert.Less(t, time.Since(start), 10*time.Second)
}

package operator

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/sr-types/luksext"
)

// dmWorld stands in for what this host cannot do without device-mapper:
// dm-crypt mappings, LVM activation and mounting (the VM tier does them
// for real). Everything else is real: cryptsetup reads and checks the
// LUKS1 header (an open is a real `cryptsetup open --test-passphrase`
// with the same key and keyslot before the mapping "appears"), the
// luksmeta slots are real, stock clevis made the binding and the TPM is
// an swtpm. The SR's filesystem is a directory that "mount" moves to the
// mountpoint and "umount" moves back, with a mount table in the
// kernel's mountinfo format.
type dmWorld struct {
	t                 *testing.T
	real              run.Runner
	devDir, mountinfo string
	lvfs              string // the LV's filesystem while unmounted
	sr                string // the VG is XSLocalEXT-<sr>
	mu                sync.Mutex
	mounts            map[string]string
	vgActive          bool
}

func (w *dmWorld) mapper(name string) string { return filepath.Join(w.devDir, "mapper", name) }
func (w *dmWorld) lv() string                { return lvm.DevPath(w.devDir, luksext.VGName(w.sr), w.sr) }

func (w *dmWorld) openMappings() []string {
	entries, _ := os.ReadDir(filepath.Join(w.devDir, "mapper"))
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), luks.NamePrefix) {
			out = append(out, e.Name())
		}
	}
	return out
}

func (w *dmWorld) fail(c run.Cmd, why string) (run.Result, error) {
	return run.Result{}, &run.CommandError{Path: c.Tool, Args: c.Args, ExitCode: 5, Err: fmt.Errorf("%s", why)}
}

func (w *dmWorld) Run(ctx context.Context, c run.Cmd) (run.Result, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	a := c.Args
	switch {
	case c.Tool == "cryptsetup" && a[0] == "open" && !slices.Contains(a, "--test-passphrase"):
		name := a[len(a)-1]
		test := append([]string{"open", "--test-passphrase"}, a[1:len(a)-1]...)
		if res, err := w.real.Run(ctx, run.Cmd{Tool: "cryptsetup", Args: test, Stdin: c.Stdin}); err != nil {
			return res, err
		}
		return run.Result{}, os.WriteFile(w.mapper(name), nil, 0o600)
	case c.Tool == "cryptsetup" && a[0] == "close":
		if w.vgActive {
			return w.fail(c, "device busy (LV active)")
		}
		return run.Result{}, os.Remove(w.mapper(a[1]))
	case c.Tool == "lvm" && a[0] == "pvs":
		var b strings.Builder
		for _, m := range w.openMappings() {
			fmt.Fprintf(&b, "  %s|%s\n", w.mapper(m), luksext.VGName(w.sr))
		}
		return run.Result{Stdout: []byte(b.String())}, nil
	case c.Tool == "lvm" && a[0] == "lvs":
		attr := "-wi-------"
		if w.vgActive {
			attr = "-wi-a-----"
			if len(w.mounts) > 0 {
				attr = "-wi-ao----"
			}
		}
		return run.Result{Stdout: []byte(fmt.Sprintf("  %s|%s\n", w.sr, attr))}, nil
	case c.Tool == "lvm" && a[0] == "vgchange":
		if a[1] == "-ay" {
			if len(w.openMappings()) == 0 {
				return w.fail(c, "volume group not found")
			}
			w.vgActive = true
			return run.Result{}, os.WriteFile(w.lv(), nil, 0o600)
		}
		if len(w.mounts) > 0 {
			return w.fail(c, "logical volume in use")
		}
		w.vgActive = false
		if err := os.Remove(w.lv()); err != nil && !os.IsNotExist(err) {
			return run.Result{}, err
		}
		return run.Result{}, nil
	case c.Tool == "e2fsck":
		return run.Result{}, nil
	}
	return w.real.Run(ctx, c)
}

// Mount moves the LV's filesystem to the mountpoint (mount(2) of the LV).
func (w *dmWorld) Mount(dev, dir, fstype string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if dev != w.lv() || !w.vgActive || fstype != "ext4" {
		return fmt.Errorf("mount -t %s %s: %w", fstype, dev, unix.ENOENT)
	}
	if err := os.Remove(dir); err != nil {
		return err
	}
	if err := os.Rename(w.lvfs, dir); err != nil {
		return err
	}
	w.mounts[dir] = dev
	return w.writeMountinfo()
}

// Unmount moves it back (umount(2)).
func (w *dmWorld) Unmount(dir string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := os.Rename(dir, w.lvfs); err != nil {
		return err
	}
	delete(w.mounts, dir)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	return w.writeMountinfo()
}

func (w *dmWorld) writeMountinfo() error {
	var b strings.Builder
	b.WriteString("25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
	i := 0
	for dir, src := range w.mounts {
		fmt.Fprintf(&b, "%d 25 254:%d / %s rw,relatime shared:%d - ext4 %s rw\n", 100+i, i, dir, 80+i, src)
		i++
	}
	return os.WriteFile(w.mountinfo, []byte(b.String()), 0o600)
}

const (
	adoptSR   = "5f0e7a2c-1b3d-4e5f-8a9b-0c1d2e3f4a5b"
	adoptBase = "11111111-1111-4111-8111-111111111111"
	adoptLeaf = "22222222-2222-4222-8222-222222222222"
	adoptSnap = "33333333-3333-4333-8333-333333333333"
)

// seed01SR builds seed 01's disk (LUKS1 sha512 512-bit key, a passphrase
// in keyslot 0, stock `clevis luks bind tpm2 '{}'` in keyslot 1 /
// luksmeta slot 1) with an SMAPIv1 ext SR on it: one snapshot made the
// FileSR way (hidden base, the VDI and its snapshot as children).
func seed01SR(t *testing.T, f *hostFixture) (*dmWorld, string) {
	tools := testenv.Tools(t, "clevis", "clevis-luks-bind", "clevis-encrypt-tpm2", "luksmeta")
	dir := t.TempDir()
	img := filepath.Join(dir, "seed01.img")
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	require.NoError(t, os.Truncate(img, 32<<20))
	key := filepath.Join(dir, "pass")
	require.NoError(t, os.WriteFile(key, []byte(hostRecovery), 0o600))
	sh := func(env []string, name string, args ...string) {
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s %v: %s", name, args, out)
	}
	sh(nil, f.tools["cryptsetup"], "luksFormat", "--type", "luks1", "-q", "-s", "512", "-h", "sha512", "--pbkdf-force-iterations", "1000", "--key-file", key, img)
	sh(f.sw.Env(), tools["clevis"], "luks", "bind", "-y", "-d", img, "-k", key, "tpm2", "{}")
	f.sw.FlushAll(t)

	w := &dmWorld{t: t, real: f.deps.Run, devDir: filepath.Join(dir, "dev"), mountinfo: filepath.Join(dir, "mountinfo"),
		lvfs: filepath.Join(dir, "lvfs"), sr: adoptSR, mounts: map[string]string{}}
	require.NoError(t, os.MkdirAll(filepath.Join(w.devDir, "mapper"), 0o700))
	require.NoError(t, w.writeMountinfo())
	require.NoError(t, os.MkdirAll(filepath.Join(w.lvfs, "lost+found"), 0o700))
	p := func(id string) string { return filepath.Join(w.lvfs, id+".vhd") }
	require.NoError(t, vhd.Create(p(adoptBase), 8<<20, vhd.CreateOptions{}))
	require.NoError(t, vhd.Snapshot(p(adoptLeaf), p(adoptBase), vhd.CreateOptions{}))
	require.NoError(t, vhd.Snapshot(p(adoptSnap), p(adoptBase), vhd.CreateOptions{}))
	img0, err := vhd.Open(p(adoptBase), true)
	require.NoError(t, err)
	require.NoError(t, img0.SetHidden(true))
	img0.Close()

	lm := luks.New(w, f.deps.Log)
	lm.DevDir = w.devDir
	f.deps.SR.LUKS = lm
	f.deps.SR.FS = &fs.FS{Run: w, MountInfo: w.mountinfo, Sys: w}
	f.deps.SR.LVM = lvm.LVM{Run: w}
	f.deps.SR.DevDir = w.devDir
	return w, img
}

const adoptNames = `uuid ( RO)                    : 22222222-2222-4222-8222-222222222222
              name-label ( RW): web01 disk
        name-description ( RW): system
               read-only ( RO): false

uuid ( RO)                    : 33333333-3333-4333-8333-333333333333
              name-label ( RW): web01 disk before upgrade
               read-only ( RO): false
`

func TestAdminHostAdoptSeed01SR(t *testing.T) {
	f := newHostFixture(t)
	w, img := seed01SR(t, f)
	names := filepath.Join(t.TempDir(), "vdis.txt")
	require.NoError(t, os.WriteFile(names, []byte(adoptNames), 0o600))

	var r adoptReport
	code, stderr := f.cli("", &r, "adopt", img, "--names", names)
	f.sw.FlushAll(t)
	require.Equal(t, ExitOK, code, stderr)
	assert.True(t, r.Changed)
	assert.Equal(t, adoptSR, r.SRUUID)
	assert.Equal(t, "lvm", r.Layout)
	assert.Contains(t, r.AuthorisedBy, "keyslot 1 (tpm2)", "stock clevis binding used, no passphrase asked")
	assert.Equal(t, map[string]string{"device": img, "sr_uuid": adoptSR, "luks-uuid": r.LUKSUUID}, r.DeviceConfig)
	require.Len(t, r.Volumes, 3)
	assert.Equal(t, adoptBase, r.Volumes[0].ID, "parents first")
	byID := map[string]struct {
		parent, name string
		hidden       bool
	}{}
	for _, v := range r.Volumes {
		byID[v.ID] = struct {
			parent, name string
			hidden       bool
		}{v.Parent, v.Name, v.Hidden}
	}
	assert.Equal(t, "", byID[adoptBase].parent)
	assert.True(t, byID[adoptBase].hidden)
	assert.Equal(t, adoptBase, byID[adoptLeaf].parent)
	assert.Equal(t, "web01 disk", byID[adoptLeaf].name)
	assert.Equal(t, adoptBase, byID[adoptSnap].parent)
	require.Len(t, r.XE, 4)
	assert.Contains(t, r.XE[0], "xe sr-introduce uuid="+adoptSR+" type=luksext")
	assert.Contains(t, r.XE[1], "device-config:sr_uuid="+adoptSR)

	// The disk: metadata ready/lvm in luksmeta slot 7, keyslots and the
	// clevis binding untouched, stock clevis still recovers slot 1's key.
	info, err := f.deps.SR.LUKS.Inspect(img)
	require.NoError(t, err)
	require.NotNil(t, info.Metadata)
	assert.Equal(t, luks.Metadata{SRUUID: adoptSR, State: luksext.StateReady, Layout: luksext.LayoutLVM, Schema: luks.MetadataSchema}, *info.Metadata)
	var slots []int
	for _, k := range info.Keyslots {
		slots = append(slots, k.ID)
	}
	assert.Equal(t, []int{0, 1}, slots)
	tools := testenv.Tools(t, "clevis", "luksmeta")
	cmd := exec.Command(tools["clevis"], "luks", "pass", "-d", img, "-s", "1")
	cmd.Env = append(os.Environ(), f.sw.Env()...)
	out, err := cmd.Output()
	f.sw.FlushAll(t)
	require.NoError(t, err)
	f.img = img
	assert.True(t, f.opens(string(out), 1), "stock clevis luks pass still opens keyslot 1")
	lm, err := exec.Command(tools["luksmeta"], "show", "-d", img).CombinedOutput()
	require.NoError(t, err, "%s", lm)
	assert.Regexp(t, `(?m)^1\s+active\s+cb6e8904-81ff-40da-a84a-07ab9ab5715e$`, string(lm), "clevis' luksmeta slot")

	// The SR: records under the old uuids, SR record with the layout, no
	// journal; everything closed again.
	st := store.New(w.lvfs)
	base, err := st.Get(adoptBase)
	require.NoError(t, err)
	assert.Nil(t, base.VDI)
	leaf, err := st.Get(adoptLeaf)
	require.NoError(t, err)
	require.NotNil(t, leaf.VDI)
	assert.Equal(t, "web01 disk", leaf.VDI.Name)
	assert.Equal(t, "system", leaf.VDI.Description)
	assert.Equal(t, adoptBase, leaf.Parent)
	var meta luksext.SRMeta
	b, err := os.ReadFile(filepath.Join(w.lvfs, luksext.SRMetaFile))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &meta))
	assert.Equal(t, luksext.SRMeta{Schema: 1, UUID: adoptSR, Name: luksext.AdoptedName, LUKSUUID: info.UUID, Device: img, Layout: "lvm"}, meta)
	pending, err := luksext.AdoptionPending(w.lvfs)
	require.NoError(t, err)
	assert.False(t, pending)
	assert.Empty(t, w.openMappings())
	assert.False(t, w.vgActive)
	assert.Empty(t, w.mounts)

	// Again: nothing to do, no key needed.
	var again adoptReport
	code, stderr = f.cli("", &again, "adopt", img)
	require.Equal(t, ExitOK, code, stderr)
	assert.False(t, again.Changed)
	assert.Equal(t, r.DeviceConfig, again.DeviceConfig)

	// status shows it as an lvm SR
	var sr statusReport
	code, _ = f.cli("", &sr, "status", img)
	f.sw.FlushAll(t)
	require.Equal(t, ExitOK, code)
	require.Len(t, sr.SRs, 1)
	assert.Equal(t, "lvm", sr.SRs[0].Layout)
	assert.Equal(t, adoptSR, sr.SRs[0].SRUUID)
}

type adoptCrash struct{ step string }

// kill -9 after a step (the process stops there: no deferred cleanup
// runs, mappings and mounts stay) and the same command again: the same
// SR as an uninterrupted adoption.
func TestAdminHostAdoptCrashAndRerun(t *testing.T) {
	// every step is crashed in the unit test (sr_adopt_steps_test.go); here
	// the first and the last with the disk side real
	for _, step := range []string{luksext.AdoptStepMetadata, luksext.AdoptStepClosed} {
		t.Run(step, func(t *testing.T) {
			f := newHostFixture(t)
			w, img := seed01SR(t, f)
			// A panic stands in for SIGKILL: Run's defers would release
			// mappings and locks a real kill leaves, so the test keeps the
			// world as the kill left it (mounts, mappings) and only the
			// process-local locks go, as they do when a process dies.
			f.deps.AdoptCrash = func(s string) {
				if s == step {
					panic(adoptCrash{s})
				}
			}
			func() {
				defer func() {
					r := recover()
					if c, ok := r.(adoptCrash); !ok || c.step != step {
						panic(r)
					}
				}()
				f.cli("", nil, "adopt", img)
				t.Fatal("no crash")
			}()
			f.sw.FlushAll(t)
			f.deps.AdoptCrash = nil
			var r adoptReport
			code, stderr := f.cli("", &r, "adopt", img)
			f.sw.FlushAll(t)
			require.Equal(t, ExitOK, code, stderr)
			assert.True(t, r.Changed)
			require.Len(t, r.Volumes, 3)
			info, err := f.deps.SR.LUKS.Inspect(img)
			require.NoError(t, err)
			assert.Equal(t, luksext.StateReady, info.Metadata.State)
			nodes, err := store.New(w.lvfs).List()
			require.NoError(t, err)
			assert.Len(t, nodes, 3)
			assert.Empty(t, w.openMappings())
			assert.Empty(t, w.mounts)
		})
	}
}

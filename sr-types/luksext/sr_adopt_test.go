package luksext

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/smapi"
)

// A disk still open under the recipe's own mapping (its systemd unit ran
// at boot) is refused before any key is asked for; the mappings an
// interrupted adopt leaves are its own, and luksext-<sr> names the SR.
// sysfs is a directory laid out as /sys/class/block is.
func TestAdoptRefusesADiskOpenUnderAnotherMapping(t *testing.T) {
	const luksUUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
	for _, tc := range []struct {
		name    string
		holders map[string]string // dm-N -> dm name
		md      *luks.Metadata
		sr      string
		inUse   string
	}{
		{name: "nothing open"},
		{name: "the recipe's mapping", holders: map[string]string{"dm-3": "luks-" + luksUUID}, inUse: "/dev/mapper/luks-" + luksUUID},
		{name: "a mapping by another name", holders: map[string]string{"dm-0": "cryptdata"}, inUse: "/dev/mapper/cryptdata"},
		{name: "adopt's temporary mapping", holders: map[string]string{"dm-1": "luksext-adopt-" + luksUUID}},
		{name: "luksext-<sr> before the metadata", holders: map[string]string{"dm-2": "luksext-" + layoutSR}, sr: layoutSR},
		{name: "luksext-<sr> naming the metadata's SR", holders: map[string]string{"dm-2": "luksext-" + layoutSR}, sr: layoutSR,
			md: &luks.Metadata{SRUUID: layoutSR, State: stateAdopting, Layout: LayoutLVM}},
		{name: "luksext-<other sr>", holders: map[string]string{"dm-2": "luksext-" + layoutSR},
			md: &luks.Metadata{SRUUID: "7a2f4c1d-5e3b-4a69-8c0d-1f2e3d4c5b6a", State: stateAdopting, Layout: LayoutLVM}, inUse: "luksext-" + layoutSR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			dev := filepath.Join(dir, "vdb")
			if err := os.WriteFile(dev, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			sys := filepath.Join(dir, "sys")
			if err := os.MkdirAll(filepath.Join(sys, "class", "block", "vdb", "holders"), 0o700); err != nil {
				t.Fatal(err)
			}
			for dm, name := range tc.holders {
				if err := os.MkdirAll(filepath.Join(sys, "class", "block", "vdb", "holders", dm), 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(filepath.Join(sys, "class", "block", dm, "dm"), 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(sys, "class", "block", dm, "dm", "name"), []byte(name+"\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s := &srService{SRDeps{SysDir: sys}}
			sr, err := s.adoptMapping(dev, luks.Info{UUID: luksUUID, Metadata: tc.md})
			if tc.inUse != "" {
				var e *smapi.Error
				if !errors.As(err, &e) || e.Kind != smapi.KindInUse || !strings.Contains(err.Error(), tc.inUse) {
					t.Fatalf("err = %v, want In_use naming %s", err, tc.inUse)
				}
				return
			}
			if err != nil || sr != tc.sr {
				t.Fatalf("sr %q err %v, want %q", sr, err, tc.sr)
			}
		})
	}
}

// The SR's logical volume open (the SMAPIv1 SR still plugged, a shell in
// it) refuses with In_use, a group that is not EXTSR's one-LV layout with
// Not_adoptable; neither activates anything.
func TestAdoptRefusesAnOpenOrForeignVolume(t *testing.T) {
	dir := t.TempDir()
	mi := filepath.Join(dir, "mountinfo")
	if err := os.WriteFile(mi, []byte("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := luks.New(nil, nil)
	m.DevDir = filepath.Join(dir, "dev")
	mapper := m.MapperPath(luks.SRName(layoutSR))
	for _, tc := range []struct {
		name string
		lvs  []lvm.LV
		kind smapi.Kind
	}{
		{"LV open", []lvm.LV{{Name: layoutSR, Active: true, Open: true}}, smapi.KindInUse},
		{"two LVs", []lvm.LV{{Name: layoutSR}, {Name: "scratch"}}, smapi.KindNotAdoptable},
		{"LV of another name", []lvm.LV{{Name: "data"}}, smapi.KindNotAdoptable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := &fakeLVM{pvs: []lvm.PV{{Name: mapper, VG: VGName(layoutSR)}}, lvs: tc.lvs}
			s := &srService{SRDeps{LUKS: m, LVM: l, DevDir: m.DevDir, FS: &fs.FS{MountInfo: mi}}}
			d := &hostAdoptDisk{s: s, ctx: context.Background(), dev: "/dev/vdb", srUUID: layoutSR, mnt: filepath.Join(dir, "adopt")}
			_, err := d.Mount()
			var e *smapi.Error
			if !errors.As(err, &e) || e.Kind != tc.kind {
				t.Fatalf("err = %v, want %s", err, tc.kind.Name)
			}
			for _, c := range l.calls {
				if strings.HasPrefix(c, "activate") {
					t.Fatalf("activated the group: %v", l.calls)
				}
			}
		})
	}
}

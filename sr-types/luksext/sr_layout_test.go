package luksext

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/smapi"
)

// fakeLVM records what the SR type asks of LVM.
type fakeLVM struct {
	pvs   []lvm.PV
	lvs   []lvm.LV
	calls []string
}

func (f *fakeLVM) PVs(context.Context) ([]lvm.PV, error) { return f.pvs, nil }
func (f *fakeLVM) LVs(_ context.Context, vg string) ([]lvm.LV, error) {
	f.calls = append(f.calls, "lvs "+vg)
	return f.lvs, nil
}
func (f *fakeLVM) Activate(_ context.Context, vg string) error {
	f.calls = append(f.calls, "activate "+vg)
	return nil
}
func (f *fakeLVM) Deactivate(_ context.Context, vg string) error {
	f.calls = append(f.calls, "deactivate "+vg)
	return nil
}

const layoutSR = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d"

// An lvm SR's volume group is activated only when its one physical
// volume is the SR's own mapping: a group of the same name on another
// disk (a clone of the old SR disk, say) is never activated in its place.
func TestLVMLayoutActivatesOnlyTheSRsOwnGroup(t *testing.T) {
	devDir := t.TempDir()
	m := luks.New(nil, nil)
	m.DevDir = devDir
	mapper := m.MapperPath(luks.SRName(layoutSR))
	vg := VGName(layoutSR)
	for _, tc := range []struct {
		name string
		pvs  []lvm.PV
		ok   bool
	}{
		{"own mapping", []lvm.PV{{Name: mapper, VG: vg}, {Name: "/dev/sda3", VG: "VG_XenStorage-x"}}, true},
		{"same name on another disk", []lvm.PV{{Name: "/dev/sdc", VG: vg}}, false},
		{"spread over two PVs", []lvm.PV{{Name: mapper, VG: vg}, {Name: "/dev/sdc", VG: vg}}, false},
		{"no group", []lvm.PV{{Name: mapper, VG: ""}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := &fakeLVM{pvs: tc.pvs, lvs: []lvm.LV{{Name: layoutSR}}}
			s := &srService{SRDeps{LUKS: m, LVM: l, DevDir: devDir}}
			dev, err := s.filesystemDevice(context.Background(), layoutSR, LayoutLVM)
			if !tc.ok {
				if err == nil || len(l.calls) != 0 {
					t.Fatalf("err %v, lvm calls %v", err, l.calls)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if want := filepath.Join(devDir, "mapper", lvm.DMName(vg, layoutSR)); dev != want {
				t.Fatalf("device %s, want %s", dev, want)
			}
			if fmt.Sprint(l.calls) != fmt.Sprintf("[activate %s lvs %s]", vg, vg) {
				t.Fatalf("calls %v", l.calls)
			}
		})
	}
	// the direct layout never calls LVM; release deactivates lvm only
	l := &fakeLVM{}
	s := &srService{SRDeps{LUKS: m, LVM: l, DevDir: devDir}}
	if dev, err := s.filesystemDevice(context.Background(), layoutSR, LayoutDirect); err != nil || dev != mapper || len(l.calls) != 0 {
		t.Fatalf("direct: %s %v %v", dev, err, l.calls)
	}
	if err := s.releaseLayout(context.Background(), layoutSR, LayoutDirect); err != nil || len(l.calls) != 0 {
		t.Fatalf("direct release: %v %v", err, l.calls)
	}
	if err := s.releaseLayout(context.Background(), layoutSR, LayoutLVM); err != nil || fmt.Sprint(l.calls) != "[deactivate "+vg+"]" {
		t.Fatalf("lvm release: %v %v", err, l.calls)
	}
	if err := checkLayout("zfs", layoutSR); err == nil {
		t.Fatal("an unknown layout is accepted")
	}
}

// SRCheck accepts a mount of the SR's LV only when the LV sits on the
// SR's mapping and the SR record says lvm; and the record's layout must
// match what is mounted either way.
func TestSRCheckLayoutOfTheMount(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "sr-mount")
	mnt := filepath.Join(root, layoutSR)
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	mapper := "/dev/mapper/" + luks.SRName(layoutSR)
	lv := "/dev/mapper/" + lvm.DMName(VGName(layoutSR), layoutSR)
	for _, tc := range []struct {
		name, src, layout string
		backs, ok         bool
	}{
		{"direct", mapper, LayoutDirect, false, true},
		{"lvm on the mapping", lv, LayoutLVM, true, true},
		{"lvm not on the mapping", lv, LayoutLVM, false, false},
		{"lvm mounted, record says direct", lv, LayoutDirect, true, false},
		{"mapping mounted, record says lvm", mapper, LayoutLVM, true, false},
		{"another LV", "/dev/mapper/XSLocalEXT--other-other", LayoutLVM, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mi := filepath.Join(dir, "mountinfo")
			line := fmt.Sprintf("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n100 25 254:1 / %s rw,relatime shared:80 - ext4 %s rw\n", mnt, tc.src)
			if err := os.WriteFile(mi, []byte(line), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := writeSRMeta(mnt, SRMeta{UUID: layoutSR, Layout: tc.layout}); err != nil {
				t.Fatal(err)
			}
			c := SRCheck{MountRoot: root, StateDir: filepath.Join(dir, "state"), MountInfo: mi, MapperDir: "/dev/mapper",
				Backs: func(lower, upper string) (bool, error) {
					if lower != mapper || upper != lv {
						return false, fmt.Errorf("asked whether %s is under %s", lower, upper)
					}
					return tc.backs, nil
				}}
			_, err := c.verify(layoutSR, mnt)
			if tc.ok && err != nil {
				t.Fatal(err)
			}
			var e *smapi.Error
			if !tc.ok && (!errors.As(err, &e) || e.Kind != smapi.KindNeedsAttention) {
				t.Fatalf("err = %v, want Needs_attention", err)
			}
		})
	}
}

package lvm

import (
	"context"
	"strings"
	"testing"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
)

func TestParsesPVsAndLVsAsLVM2PrintsThem(t *testing.T) {
	f := runfake.New()
	f.Handle("lvm", func(c runfake.Call) (run.Result, error) {
		switch c.Args[0] {
		case "pvs":
			// lvm2 2.02/2.03 with --noheadings --separator '|': two-space
			// indent, empty vg_name for an orphan PV
			return run.Result{Stdout: []byte("  /dev/mapper/luksext-a|XSLocalEXT-a\n  /dev/sdc|\n")}, nil
		case "lvs":
			return run.Result{Stdout: []byte("  a|-wi-ao----\n  b|-wi-------\n")}, nil
		}
		return run.Result{}, nil
	})
	l := LVM{Run: f}
	pvs, err := l.PVs(context.Background())
	if err != nil || len(pvs) != 2 || pvs[0] != (PV{"/dev/mapper/luksext-a", "XSLocalEXT-a"}) || pvs[1] != (PV{"/dev/sdc", ""}) {
		t.Fatalf("pvs %+v %v", pvs, err)
	}
	lvs, err := l.LVs(context.Background(), "XSLocalEXT-a")
	if err != nil || len(lvs) != 2 || lvs[0] != (LV{"a", true, true}) || lvs[1] != (LV{"b", false, false}) {
		t.Fatalf("lvs %+v %v", lvs, err)
	}
	if err := l.Activate(context.Background(), "XSLocalEXT-a"); err != nil {
		t.Fatal(err)
	}
	if err := l.Deactivate(context.Background(), "XSLocalEXT-a"); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, c := range f.Calls() {
		lines = append(lines, c.Line())
	}
	want := "udevadm settle --timeout=10\nlvm pvs --noheadings --separator | -o pv_name,vg_name\nlvm lvs --noheadings --separator | -o lv_name,lv_attr XSLocalEXT-a\nlvm vgchange -ay XSLocalEXT-a\nlvm vgchange -an XSLocalEXT-a"
	if got := strings.Join(lines, "\n"); got != want {
		t.Fatalf("calls:\n%s\nwant:\n%s", got, want)
	}
}

func TestDMNameDoublesDashes(t *testing.T) {
	got := DMName("XSLocalEXT-1a2b3c4d-0000-4000-8000-000000000001", "1a2b3c4d-0000-4000-8000-000000000001")
	want := "XSLocalEXT--1a2b3c4d--0000--4000--8000--000000000001-1a2b3c4d--0000--4000--8000--000000000001"
	if got != want {
		t.Fatalf("%s", got)
	}
}

package adopt

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/vhd"
)

const (
	base = "11111111-1111-4111-8111-111111111111"
	leaf = "22222222-2222-4222-8222-222222222222"
	snap = "33333333-3333-4333-8333-333333333333"
	solo = "44444444-4444-4444-8444-444444444444"
)

// vhdUtil is blktap's vhd-util (../shared/dom0), the tool SMAPIv1's
// FileSR runs: fixtures made by it do not depend on plugins/vhd.
func vhdUtil(t *testing.T) func(dir string, args ...string) {
	t.Helper()
	tree := testenv.Dom0Tree(t, "blktap", t.TempDir())
	bin := filepath.Join(tree, "bin", "vhd-util")
	return func(dir string, args ...string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("vhd-util %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
}

// fileSRTree makes what FileSR leaves after one snapshot of leaf (plus an
// unrelated VDI): the leaf's image renamed to the base's uuid and hidden,
// and two differencing children, the VDI under its old uuid and the
// snapshot, with relative parent locators (FileSR._snapshot runs
// vhd-util snapshot in the SR directory).
func fileSRTree(t *testing.T, dir string) {
	v := vhdUtil(t)
	v(dir, "create", "-n", leaf+".vhd", "-s", "8")
	v(dir, "create", "-n", solo+".vhd", "-s", "4")
	if err := os.Rename(filepath.Join(dir, leaf+".vhd"), filepath.Join(dir, base+".vhd")); err != nil {
		t.Fatal(err)
	}
	v(dir, "snapshot", "-n", leaf+".vhd", "-p", base+".vhd")
	v(dir, "snapshot", "-n", snap+".vhd", "-p", base+".vhd")
	v(dir, "set", "-n", base+".vhd", "-f", "hidden", "-v", "1")
}

const namesDump = `uuid ( RO)                    : 22222222-2222-4222-8222-222222222222
              name-label ( RW): web disk
        name-description ( RW): root  fs 
           is-a-snapshot ( RO): false
            virtual-size ( RO): 8388608
                sharable ( RO): false
               read-only ( RO): false
     parent ( RO) [DEPRECATED]: <not in database>
               sm-config (MRO): vhd-parent: 11111111-1111-4111-8111-111111111111


uuid ( RO)                    : 33333333-3333-4333-8333-333333333333
              name-label ( RW): web disk snapshot
        name-description ( RW): 
           is-a-snapshot ( RO): true
               read-only ( RO): true

uuid ( RO)                    : 55555555-5555-4555-8555-555555555555
              name-label ( RW): gone
`

func TestScanFileSRSnapshotTree(t *testing.T) {
	dir := t.TempDir()
	fileSRTree(t, dir)
	if err := os.Mkdir(filepath.Join(dir, "lost+found"), 0o700); err != nil {
		t.Fatal(err)
	}
	names, err := ParseNames(strings.NewReader(namesDump))
	if err != nil {
		t.Fatal(err)
	}
	plan, err := Scan(dir, names, false)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Node{}
	var order []string
	for _, n := range plan.Nodes {
		got[n.ID] = n
		order = append(order, n.ID)
	}
	if len(got) != 4 {
		t.Fatalf("plan has %d nodes (%v), want 4", len(got), order)
	}
	want := map[string]struct {
		parent string
		hidden bool
		size   int64
		name   string
		rw     bool
	}{
		base: {"", true, 8 << 20, "", false},
		leaf: {base, false, 8 << 20, "web disk", true},
		snap: {base, false, 8 << 20, "web disk snapshot", false},
		solo: {"", false, 4 << 20, "", true},
	}
	for id, w := range want {
		n := got[id]
		if n.Parent != w.parent || n.Hidden != w.hidden || n.VirtualSize != w.size || n.Name != w.name {
			t.Errorf("%s: got parent %q hidden %v size %d name %q, want %+v", id, n.Parent, n.Hidden, n.VirtualSize, n.Name, w)
		}
		r := n.Record()
		if w.hidden != (r.VDI == nil) {
			t.Errorf("%s: record VDI %v for hidden=%v", id, r.VDI, w.hidden)
		}
		if r.VDI != nil && r.VDI.ReadWrite != w.rw {
			t.Errorf("%s: read_write %v, want %v", id, r.VDI.ReadWrite, w.rw)
		}
		if err := r.Validate(); err != nil {
			t.Errorf("%s: %v", id, err)
		}
	}
	if got[leaf].Description != "root  fs " {
		t.Errorf("description %q: the value must be kept as xe printed it", got[leaf].Description)
	}
	pos := map[string]int{}
	for i, id := range order {
		pos[id] = i
	}
	if pos[base] > pos[leaf] || pos[base] > pos[snap] {
		t.Errorf("parents must come first: %v", order)
	}
	if len(plan.NamesUnused) != 1 || plan.NamesUnused[0] != "55555555-5555-4555-8555-555555555555" {
		t.Errorf("names_unused = %v", plan.NamesUnused)
	}
	// Our own files are refused on a first run, accepted on a rerun.
	if err := os.WriteFile(filepath.Join(dir, "luksext-sr.json"), []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Scan(dir, nil, false); !isNotAdoptable(err) {
		t.Errorf("luksext-sr.json on a first run: err %v", err)
	}
	if _, err := Scan(dir, nil, true); err != nil {
		t.Errorf("rerun: %v", err)
	}
}

func isNotAdoptable(err error) bool {
	var e *smapi.Error
	return errors.As(err, &e) && e.Kind == smapi.KindNotAdoptable
}

// Every file or state luksext does not take over refuses the whole SR,
// naming the file.
func TestScanRefusals(t *testing.T) {
	mkvhd := func(t *testing.T, dir, id string) {
		if err := vhd.Create(filepath.Join(dir, id+".vhd"), 4<<20, vhd.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	touch := func(name string) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name, mention string
		make          func(t *testing.T, dir string)
	}{
		{"raw VDI", solo + ".raw", touch(solo + ".raw")},
		{"CBT log", solo + ".cbtlog", touch(solo + ".cbtlog")},
		{"relink journal", "relink_" + solo, touch("relink_" + solo)},
		{"coalesce journal", "coalesce_" + solo + "_1", touch("coalesce_" + solo + "_1")},
		{"leaf journal", "leaf_" + solo, touch("leaf_" + solo)},
		{"OLD_ file", "OLD_" + solo + ".vhd", touch("OLD_" + solo + ".vhd")},
		{"IntelliCache", solo + ".vhdcache", touch(solo + ".vhdcache")},
		{"unknown file", "notes.txt", touch("notes.txt")},
		{"unfinished snapshot image", solo + ".vhd.new", touch(solo + ".vhd.new")},
		{"resize journal", ".journal-" + solo, touch(".journal-" + solo)},
		{"qcow2 VDI", solo + ".qcow2", touch(solo + ".qcow2")},
		{"unfinished filelog entry", "never finished", func(t *testing.T, dir string) {
			log := "2025-01-02 10:00:00.1 log: /var/run/sr-mount/s /var/run/sr-mount/s/" + snap + ".vhd vdi_clone s " + snap + "\n" +
				"2025-01-02 10:00:01.1 end: /var/run/sr-mount/s /var/run/sr-mount/s/" + snap + ".vhd done\n" +
				"2025-01-03 10:00:00.1 log: /var/run/sr-mount/s /var/run/sr-mount/s/" + snap + ".vhd vdi_clone s " + snap + " " + leaf + "\n"
			if err := os.WriteFile(filepath.Join(dir, "filelog.txt"), []byte(log), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"upper-case name", "AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE.vhd", func(t *testing.T, dir string) { mkvhd(t, dir, "AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE") }},
		{"not a VHD", solo + ".vhd", touch(solo + ".vhd")},
		{"hard link", "hard links", func(t *testing.T, dir string) {
			mkvhd(t, dir, solo)
			if err := os.Link(filepath.Join(dir, solo+".vhd"), filepath.Join(dir, base+".vhd")); err != nil {
				t.Fatal(err)
			}
		}},
		{"missing parent", "parent " + base + ".vhd is missing", func(t *testing.T, dir string) {
			mkvhd(t, dir, base)
			if err := vhd.Snapshot(filepath.Join(dir, leaf+".vhd"), filepath.Join(dir, base+".vhd"), vhd.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(filepath.Join(dir, base+".vhd")); err != nil {
				t.Fatal(err)
			}
		}},
		{"parent uuid mismatch", "expects a parent with VHD uuid", func(t *testing.T, dir string) {
			mkvhd(t, dir, base)
			if err := vhd.Snapshot(filepath.Join(dir, leaf+".vhd"), filepath.Join(dir, base+".vhd"), vhd.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			mkvhd(t, dir, base) // a new image under the parent's name
			setHidden(t, filepath.Join(dir, base+".vhd"))
		}},
		{"hidden without children", "hidden base no VHD uses", func(t *testing.T, dir string) {
			mkvhd(t, dir, base)
			setHidden(t, filepath.Join(dir, base+".vhd"))
		}},
		{"visible parent", "visible VDI that other VHDs", func(t *testing.T, dir string) {
			mkvhd(t, dir, base)
			if err := vhd.Snapshot(filepath.Join(dir, leaf+".vhd"), filepath.Join(dir, base+".vhd"), vhd.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			mkvhd(t, dir, snap) // a good VDI beside the bad thing
			tc.make(t, dir)
			_, err := Scan(dir, nil, false)
			if !isNotAdoptable(err) {
				t.Fatalf("err = %v, want Not_adoptable", err)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("the refusal does not mention %q: %v", tc.mention, err)
			}
		})
	}
}

// FileSR's finished operation log and SharedFileSR's hard-link note are
// history, not data: they stay and do not refuse the SR.
func TestScanKeepsFinishedFileSRLog(t *testing.T) {
	dir := t.TempDir()
	if err := vhd.Create(filepath.Join(dir, solo+".vhd"), 4<<20, vhd.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	log := "2025-01-02 10:00:00.1 log: /var/run/sr-mount/s /var/run/sr-mount/s/" + solo + ".vhd vdi_clone s " + solo + "\n" +
		"2025-01-02 10:00:01.1 end: /var/run/sr-mount/s /var/run/sr-mount/s/" + solo + ".vhd error\n"
	for name, body := range map[string]string{"filelog.txt": log, "sm-hardlink.conf": "1"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	plan, err := Scan(dir, nil, false)
	if err != nil || len(plan.Nodes) != 1 {
		t.Fatalf("plan %+v err %v", plan, err)
	}
}

func setHidden(t *testing.T, p string) {
	img, err := vhd.Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.SetHidden(true); err != nil {
		t.Fatal(err)
	}
}

func TestParseNamesRefusesWhatIsNotXeOutput(t *testing.T) {
	for _, bad := range []string{
		"name-label ( RW): x\n",               // before any uuid
		"uuid ( RO): not-a-uuid\n",            // bad uuid
		"uuid ( RO)    : " + leaf + "\nfoo\n", // not a key line
		"uuid ( RO): " + leaf + "\n\nuuid ( RO): " + leaf + "\n",
	} {
		if _, err := ParseNames(strings.NewReader(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	n, err := ParseNames(strings.NewReader(""))
	if err != nil || len(n) != 0 {
		t.Errorf("empty dump: %v %v", n, err)
	}
}

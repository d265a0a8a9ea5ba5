package luksext

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/sr-types/luksext/adopt"
)

// fakeAdoptDisk is the device side of an adoption on a plain directory:
// "mounting" returns it, the disk's luksext metadata state is a field.
// What it does not do is what needs root (cryptsetup, lvm, mount); the
// order of the commit, which is what a crash tests, is all real.
type fakeAdoptDisk struct {
	root     string
	state    string
	mounted  bool
	releases int
}

func (d *fakeAdoptDisk) Mount() (string, error) { d.mounted = true; return d.root, nil }
func (d *fakeAdoptDisk) Release() error         { d.mounted = false; d.releases++; return nil }
func (d *fakeAdoptDisk) SetState(s string) error {
	if d.mounted && s == stateReady {
		return errors.New("BUG: ready written while the SR is still mounted")
	}
	d.state = s
	return nil
}

const (
	tBase = "11111111-1111-4111-8111-111111111111"
	tLeaf = "22222222-2222-4222-8222-222222222222"
	tSnap = "33333333-3333-4333-8333-333333333333"
)

// smapiV1Tree writes a snapshot tree as FileSR leaves it: a hidden base
// and two children (made with plugins/vhd here; the adopt package's own
// tests build the same with blktap's vhd-util).
func smapiV1Tree(t *testing.T, dir string) {
	t.Helper()
	p := func(id string) string { return filepath.Join(dir, id+".vhd") }
	if err := vhd.Create(p(tBase), 4<<20, vhd.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{tLeaf, tSnap} {
		if err := vhd.Snapshot(p(c), p(tBase), vhd.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	img, err := vhd.Open(p(tBase), true)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.SetHidden(true); err != nil {
		t.Fatal(err)
	}
	img.Close()
}

// snapshotDir is every file under dir with its content hash (records and
// VHDs), the adopt journal excluded only if absent.
func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = hex.EncodeToString(h.Sum(nil))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

type crashed struct{ step string }

func runAdopt(t *testing.T, d *fakeAdoptDisk, names map[string]adopt.Names, crashAt string) (plan adopt.Plan, err error, crashedAt string) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			c, ok := r.(crashed)
			if !ok {
				panic(r)
			}
			crashedAt = c.step
		}
	}()
	r := adoptRun{Disk: d, State: d.state, Names: names,
		Meta: SRMeta{UUID: "99999999-9999-4999-8999-999999999999", Name: "x", LUKSUUID: "l", Device: "/dev/x", Layout: LayoutLVM}}
	r.Crash = func(step string) {
		if step == crashAt {
			panic(crashed{step})
		}
	}
	plan, err = r.run()
	return plan, err, ""
}

// A crash (kill -9) after any step, then a rerun WITHOUT --names,
// converges to exactly what an uninterrupted adoption writes; the VHD
// files are never changed.
func TestAdoptRerunAfterCrashAtEachStepConverges(t *testing.T) {
	names := map[string]adopt.Names{tLeaf: {Name: "web", Description: "root disk"}, tSnap: {Name: "web snap", ReadOnly: true}}

	ref := &fakeAdoptDisk{root: t.TempDir()}
	smapiV1Tree(t, ref.root)
	vhds := snapshotDir(t, ref.root)
	if _, err, _ := runAdopt(t, ref, names, ""); err != nil {
		t.Fatal(err)
	}
	want := snapshotDir(t, ref.root)
	if ref.state != stateReady || ref.mounted {
		t.Fatalf("uninterrupted run: state %q mounted %v", ref.state, ref.mounted)
	}
	for f, h := range vhds {
		if want[f] != h {
			t.Fatalf("adopt changed %s", f)
		}
	}
	if _, ok := want[filepath.Join(store.MetaDir, "adopt.json")]; ok {
		t.Fatal("the adopt journal is left behind")
	}
	n := 0
	for f := range want {
		if strings.HasPrefix(f, filepath.Join(store.MetaDir, "nodes")) {
			n++
		}
	}
	if n != 3 {
		t.Fatalf("%d records, want 3: %v", n, want)
	}
	// the records say what the plan said
	st := store.New(ref.root)
	base, err := st.Get(tBase)
	if err != nil || base.VDI != nil || base.Parent != "" {
		t.Fatalf("base record %+v %v", base, err)
	}
	leaf, err := st.Get(tLeaf)
	if err != nil || leaf.VDI == nil || leaf.VDI.Name != "web" || leaf.Parent != tBase || !leaf.VDI.ReadWrite {
		t.Fatalf("leaf record %+v %v", leaf, err)
	}

	for _, step := range AdoptSteps {
		t.Run(step, func(t *testing.T) {
			d := &fakeAdoptDisk{root: t.TempDir()}
			smapiV1Tree(t, d.root)
			// same VHD bytes as the reference (uuids/timestamps differ per
			// Create): copy the reference's VHDs instead
			for f := range vhds {
				b, err := os.ReadFile(filepath.Join(ref.root, f))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(d.root, f), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err, at := runAdopt(t, d, names, step)
			if at != step {
				t.Fatalf("did not crash at %s (err %v)", step, err)
			}
			if step == AdoptStepJournal || step == AdoptStepRecords || step == AdoptStepSRRecord {
				// the GC's guard sees the half-done adoption
				if p, err := AdoptionPending(d.root); err != nil || !p {
					t.Fatalf("AdoptionPending = %v, %v after %s", p, err, step)
				}
			}
			d.mounted = step != AdoptStepClosed && step != AdoptStepReady // a crash before "closed" leaves it mounted
			// Names are staged with the journal: from then on a rerun
			// without --names keeps them; before, the same command reruns.
			again := names
			if step != AdoptStepMetadata {
				again = nil
			}
			if _, err, _ := runAdopt(t, d, again, ""); err != nil {
				t.Fatalf("rerun: %v", err)
			}
			got := snapshotDir(t, d.root)
			if d.state != stateReady || d.mounted {
				t.Fatalf("state %q mounted %v after the rerun", d.state, d.mounted)
			}
			if !equalMaps(got, want) {
				t.Fatalf("after a crash at %s and a rerun:\n got %v\nwant %v", step, keys(got), keys(want))
			}
			// and a third run changes nothing
			if _, err, _ := runAdopt(t, d, nil, ""); err != nil {
				t.Fatal(err)
			}
			if !equalMaps(snapshotDir(t, d.root), want) {
				t.Fatal("a run on an adopted SR changed it")
			}
		})
	}
}

// A refusal writes nothing, not even the disk metadata.
func TestAdoptRefusalChangesNothing(t *testing.T) {
	d := &fakeAdoptDisk{root: t.TempDir()}
	smapiV1Tree(t, d.root)
	if err := os.WriteFile(filepath.Join(d.root, tLeaf+".cbtlog"), []byte("cbt"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := snapshotDir(t, d.root)
	_, err, _ := runAdopt(t, d, nil, "")
	var e *smapi.Error
	if !errors.As(err, &e) || e.Kind != smapi.KindNotAdoptable || !strings.Contains(err.Error(), tLeaf+".cbtlog") {
		t.Fatalf("err = %v", err)
	}
	if d.state != "" || d.mounted {
		t.Fatalf("state %q mounted %v after a refusal", d.state, d.mounted)
	}
	if !equalMaps(snapshotDir(t, d.root), before) {
		t.Fatal("a refused adoption changed files")
	}
}

// A rerun whose VHDs changed since the journal was staged stops.
func TestAdoptRerunRefusesChangedFiles(t *testing.T) {
	d := &fakeAdoptDisk{root: t.TempDir()}
	smapiV1Tree(t, d.root)
	if _, _, at := runAdopt(t, d, nil, AdoptStepJournal); at != AdoptStepJournal {
		t.Fatal("no crash")
	}
	if err := vhd.Create(filepath.Join(d.root, "44444444-4444-4444-8444-444444444444.vhd"), 2<<20, vhd.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err, _ := runAdopt(t, d, nil, "")
	if err == nil || !strings.Contains(err.Error(), "changed since") {
		t.Fatalf("err = %v", err)
	}
	if d.state != stateAdopting {
		t.Fatalf("state %q", d.state)
	}
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

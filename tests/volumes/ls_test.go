package volumes

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/sr-types/luksext"
)

// lsAgrees checks SR.ls against the record files read directly and a stat
// of each leaf.
func (s *sr) lsAgrees(what string) {
	t := s.t
	t.Helper()
	var got []smapi.Volume
	s.call("SR.ls", &got)
	files, err := filepath.Glob(filepath.Join(s.dir, store.MetaDir, "nodes", "*.json"))
	require.NoError(t, err)
	type row struct {
		Key, Name string
		Virtual   int64
		Phys      int64
		Keys      map[string]string
	}
	var want, have []row
	for _, f := range files {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		var n store.Node
		require.NoError(t, json.Unmarshal(b, &n))
		if n.VDI == nil {
			continue
		}
		var st syscall.Stat_t
		require.NoError(t, syscall.Stat(filepath.Join(s.dir, n.File()), &st))
		keys := n.VDI.Keys
		if keys == nil {
			keys = map[string]string{}
		}
		want = append(want, row{n.ID, n.VDI.Name, n.VirtualSize, st.Blocks * 512, keys})
	}
	for _, v := range got {
		have = append(have, row{v.Key, v.Name, v.VirtualSize, v.PhysicalUtilisation, v.Keys})
	}
	sort.Slice(want, func(i, j int) bool { return want[i].Key < want[j].Key })
	sort.Slice(have, func(i, j int) bool { return have[i].Key < have[j].Key })
	require.Equal(t, want, have, "%s: SR.ls says what the records and images say", what)
	// SR.ls left a current listing cache, which the next change must
	// make stale: every step of the tests below checks that it does.
	require.True(t, store.New(s.dir).ListingCurrent(), "%s: SR.ls saved its listing cache", what)
}

// SR.ls stays true to the records and the images through every call that changes a
// record and through the GC, also when the GC is killed mid-coalesce.
func TestSRLsFollowsEveryChange(t *testing.T) {
	s, a, c1 := buildTree(t)
	s.lsAgrees("after create, snapshot, clone, destroy")
	s.call("Volume.set_name", nil, "key", a, "new_name", "renamed")
	s.lsAgrees("after set_name")
	s.call("Volume.set", nil, "key", a, "k", "vdi-type", "v", "user")
	s.call("Volume.set", nil, "key", c1, "k", "<html & \"quotes\">", "v", "é")
	s.lsAgrees("after set")
	s.call("Volume.unset", nil, "key", a, "k", "vdi-type")
	s.lsAgrees("after unset")
	s.call("Volume.resize", nil, "key", c1, "new_size", 2*volSize)
	s.lsAgrees("after resize")
	// A guest grows the leaf through tapdisk: physical_utilisation
	// follows while the VM runs (the leaf has a datapath record: stat'ed
	// at every call) and after it stopped (its teardown invalidated the
	// cached allocations).
	m := s.start(c1)
	s.lsAgrees("after the VM started")
	m.write(1)
	s.lsAgrees("after a guest write")
	m.write(2)
	s.lsAgrees("after another guest write")
	m.stop()
	s.lsAgrees("after the VM stopped")

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashAt+"="+s.dir+"|reparented")
	require.Error(t, cmd.Run(), "the GC was killed")
	s.lsAgrees("after a GC killed mid-coalesce")
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	s.lsAgrees("after the GC")
	s.destroy(a)
	s.lsAgrees("after destroy")
	require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
	s.lsAgrees("after the GC removed the unused base")
}

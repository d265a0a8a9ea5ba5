package volumes

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/sr-types/luksext"
)

// lsSeedEnv replays a sequence of TestSRLsAllocationsStayExact.
const lsSeedEnv = "LUKSEXT_LS_SEED"

// SR.ls serves physical_utilisation from a cache (sr-types/luksext/
// volume_ls.go). After every step of a random sequence of volume calls,
// VMs started, writing and stopped through the datapath (tapdiskfake),
// and GC passes, every VDI's physical_utilisation must equal a fresh stat
// of its leaf (lsAgrees), on a real ext4 (a loop device mounted where
// SR.attach mounts, checked by the real SR handle check).
func TestSRLsAllocationsStayExact(t *testing.T) {
	mnt := attachedSR(t, 256, 4096)
	s := newSRAt(t, mnt, luksext.SRCheck{})
	seed := time.Now().UnixNano()
	if v := os.Getenv(lsSeedEnv); v != "" {
		var err error
		seed, err = strconv.ParseInt(v, 10, 64)
		require.NoError(t, err)
	}
	t.Logf("seed %d (rerun with %s=%d)", seed, lsSeedEnv, seed)
	r := rand.New(rand.NewSource(seed))

	running := map[string]*vm{}
	keys := func(attached bool) []string {
		var out []string
		for k := range s.model {
			if (running[k] != nil) == attached {
				out = append(out, k)
			}
		}
		sort.Strings(out)
		return out
	}
	pick := func(ks []string) string { return ks[r.Intn(len(ks))] }
	size := func(k string) int64 {
		var st smapi.Volume
		s.call("Volume.stat", &st, "key", k)
		return st.VirtualSize
	}
	// Volumes of 32 VHD blocks, which the VMs below allocate one by one
	// (no content model: lsAgrees compares allocations only).
	create := func(name string) string {
		var v smapi.Volume
		s.call("Volume.create", &v, "name", name, "description", "", "size", 64*mib, "sharable", false)
		s.model[v.Key] = nil
		return v.Key
	}
	// write is a guest write of one sector somewhere on the disk, through
	// the tapdisk serving it: it mostly allocates a block in the leaf.
	write := func(k string) {
		m := running[k]
		m.sync()
		_, err := s.blktap.Write(m.minor)
		require.NoError(t, err, "the VM's disk must not be paused")
		sector := make([]byte, 512)
		sector[0] = 1
		_, err = m.img.WriteAt(sector, r.Int63n(size(k)/512)*512)
		require.NoError(t, err)
	}
	create("first")
	s.lsAgrees("created the first volume")
	const steps = 100
	done := map[string]int{} // how often each kind of step ran
	for i := 0; i < steps; i++ {
		idle, busy := keys(false), keys(true)
		var what string
		switch op := r.Intn(11); {
		case op == 0 && len(s.model) < 6:
			what = "create " + create(fmt.Sprint("v", i))
		case op == 1 && len(s.model) < 8:
			k := pick(append(idle, busy...))
			what = "snapshot " + k + " -> " + s.snapshot("Volume.snapshot", k)
		case op == 2 && len(s.model) < 8:
			k := pick(append(idle, busy...))
			what = "clone " + k + " -> " + s.snapshot("Volume.clone", k)
		case op == 3 && len(idle) > 1:
			k := pick(idle)
			s.destroy(k)
			what = "destroy " + k
		case op == 4:
			k := pick(append(idle, busy...))
			s.call("Volume.resize", nil, "key", k, "new_size", size(k)+2*mib)
			what = "resize " + k
		case op == 5 && len(idle) > 0 && len(busy) < 3:
			k := pick(idle)
			running[k] = s.start(k)
			what = "start " + k
		case (op == 6 || op == 7) && len(busy) > 0:
			k := pick(busy)
			write(k)
			what = "write " + k
		case op == 8 && len(busy) > 0:
			k := pick(busy)
			running[k].stop()
			delete(running, k)
			what = "stop " + k
		case op == 9:
			require.NoError(t, luksext.CollectOnce(context.Background(), s.dir, s.deps(), nil, quietLog()))
			for _, m := range running {
				m.sync() // tapdisk reopened its leaf after a pause
			}
			what = "GC"
		case op == 10 || len(busy) == 0 && (len(idle) == 0 || len(busy) >= 3):
			k := pick(append(idle, busy...))
			s.call("Volume.set_name", nil, "key", k, "new_name", fmt.Sprint("n", i))
			what = "set_name " + k
		case len(busy) > 0:
			k := pick(busy)
			write(k)
			what = "write " + k
		default:
			k := pick(idle)
			running[k] = s.start(k)
			what = "start " + k
		}
		s.lsAgrees(fmt.Sprintf("seed %d, step %d (%s)", seed, i, what))
		kind, _, _ := strings.Cut(what, " ")
		done[kind]++
	}
	t.Logf("steps: %v", done)
	for k, m := range running {
		m.stop()
		delete(running, k)
		s.lsAgrees("stopped the VM of " + k)
	}
}

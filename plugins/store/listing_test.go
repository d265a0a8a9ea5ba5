package store

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// ListCached is Listing with every VDI's keys as a map, as List returns
// them, so that the tests compare the two directly.
func (s Store) ListCached() ([]Node, error) {
	l, err := s.Listing()
	if err != nil {
		return nil, err
	}
	for i, n := range l.Nodes {
		if n.VDI != nil && !l.nilKeys(i) {
			if err := json.Unmarshal([]byte(l.keys[i]), &n.VDI.Keys); err != nil {
				return nil, err
			}
		}
	}
	return l.Nodes, nil
}

func sorted(n []Node) []Node {
	out := append([]Node(nil), n...)
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// requireListed: ListCached says exactly what the records say.
func requireListed(t *testing.T, s Store, what string) {
	t.Helper()
	want, err := s.List()
	require.NoError(t, err)
	got, err := s.ListCached()
	require.NoError(t, err, what)
	require.Equal(t, sorted(want), sorted(got), "%s: the listing is the records", what)
}

func randomNode(r *rand.Rand, parents []string) Node {
	n := Node{Schema: Schema, ID: NewID(), Format: FormatVHD, VirtualSize: r.Int63n(1 << 42)}
	if r.Intn(4) == 0 {
		n.Format = FormatQCOW2
	}
	if len(parents) > 0 && r.Intn(2) == 0 {
		n.Parent = parents[r.Intn(len(parents))]
	}
	if r.Intn(5) > 0 {
		names := []string{"", "vol", "disque système « é »", "日本語", `q"uo\te`, "<b>&amp;", "\x00\n\t", "😀"}
		n.VDI = &VDI{Name: names[r.Intn(len(names))], Description: names[r.Intn(len(names))],
			ReadWrite: r.Intn(2) == 0, Sharable: r.Intn(2) == 0}
		if r.Intn(6) > 0 {
			n.VDI.Keys = map[string]string{}
			for k := r.Intn(4); k > 0; k-- {
				n.VDI.Keys[names[r.Intn(len(names))]+fmt.Sprint(k)] = names[r.Intn(len(names))]
			}
		}
	}
	return n
}

// The cache answers only while nothing changed, and every kind of record
// change through the store (create, replace, delete, also of an absent
// record) makes the next listing come from the records again.
func TestListCachedFollowsEveryChange(t *testing.T) {
	s := New(t.TempDir())
	require.NoError(t, os.MkdirAll(s.Dir(), 0o700))
	got, err := s.ListCached()
	require.NoError(t, err)
	require.Empty(t, got, "a fresh SR")

	r := rand.New(rand.NewSource(2))
	var ids []string
	for i := 0; i < 60; i++ {
		n := randomNode(r, ids)
		require.NoError(t, s.Put(n))
		ids = append(ids, n.ID)
	}
	requireListed(t, s, "first listing")
	require.True(t, s.ListingCurrent(), "the first listing built the cache")
	requireListed(t, s, "from the cache")

	changes := []struct {
		what string
		do   func()
	}{
		{"create", func() { n := randomNode(r, ids); ids = append(ids, n.ID); require.NoError(t, s.Put(n)) }},
		{"rename (replace a record)", func() {
			n, err := s.Get(ids[7])
			require.NoError(t, err)
			if n.VDI == nil {
				n.VDI = &VDI{}
			}
			n.VDI.Name = "renamed"
			require.NoError(t, s.Put(n))
		}},
		{"resize (same record size)", func() {
			n, err := s.Get(ids[8])
			require.NoError(t, err)
			n.VirtualSize++
			require.NoError(t, s.Put(n))
		}},
		{"delete", func() { require.NoError(t, s.Delete(ids[9])) }},
		{"delete of an absent record", func() { require.NoError(t, s.Delete(NewID())) }},
	}
	for _, c := range changes {
		c.do()
		require.False(t, s.ListingCurrent(), "%s: the cache is stale", c.what)
		requireListed(t, s, c.what)
		require.True(t, s.ListingCurrent(), "%s: the listing rebuilt the cache", c.what)
		requireListed(t, s, c.what+", from the cache")
	}
}

// Record files created or removed by something that does not go through
// the store (an older luksext, a person) change the nodes directory, which
// the cache's tag includes.
func TestListCachedSeesChangesBehindTheStore(t *testing.T) {
	s := New(t.TempDir())
	a, b := Node{ID: NewID(), Format: FormatVHD}, Node{ID: NewID(), Format: FormatVHD}
	require.NoError(t, s.Put(a))
	require.NoError(t, s.Put(b))
	requireListed(t, s, "first")
	require.True(t, s.ListingCurrent())
	// The directory's timestamps have the file system's granularity (a
	// second on ext4 with 128-byte inodes).
	time.Sleep(1100 * time.Millisecond)
	require.NoError(t, os.Remove(s.recordPath(a.ID)))
	requireListed(t, s, "after a record was removed by hand")
	time.Sleep(1100 * time.Millisecond)
	require.NoError(t, os.WriteFile(s.recordPath(a.ID), []byte(`{"schema":1,"id":"`+a.ID+`","format":"vhd","virtual_size":5}`), 0o600))
	requireListed(t, s, "after a record was added by hand")
}

// A damaged, foreign or hostile cache file is never believed.
func TestListCachedRefusesBadCaches(t *testing.T) {
	s := New(t.TempDir())
	r := rand.New(rand.NewSource(3))
	for i := 0; i < 50; i++ {
		require.NoError(t, s.Put(randomNode(r, nil)))
	}
	requireListed(t, s, "first")
	good, err := os.ReadFile(s.listingPath())
	require.NoError(t, err)
	tag, ok := s.currentTag(false)
	require.True(t, ok)

	bad := map[string][]byte{
		"empty":     {},
		"truncated": good[:len(good)/2],
		"bit flip":  append(append(append([]byte{}, good[:len(good)/2]...), good[len(good)/2]^1), good[len(good)/2+1:]...),
		"no crc":    good[:len(good)-4],
	}
	// a well-formed cache of the right generation naming a path outside
	// the SR, or listing a volume that does not exist
	hostile, _ := encodeListing(tag, []Node{{ID: "../../../../etc/passwd-0000-0000-000000000000", Format: FormatVHD}})
	bad["hostile id"] = hostile
	// a correct cache of another state
	old := tag
	old.gen[0] ^= 1
	bad["other generation"], _ = encodeListing(old, mustList(t, s))

	for what, b := range bad {
		require.NoError(t, os.WriteFile(s.listingPath(), b, 0o600))
		requireListed(t, s, what)
		require.True(t, s.ListingCurrent(), "%s: replaced by a good cache", what)
	}
}

func mustList(t *testing.T, s Store) []Node {
	n, err := s.List()
	require.NoError(t, err)
	return n
}

// A writer killed at any point (kill -9 between its generation bump and
// its record change, in the middle of a record write, ...) and listings
// built while it ran never leave a cache that is believed and wrong.
func TestListCachedSurvivesKilledConcurrentWriters(t *testing.T) {
	dir := t.TempDir()
	s := New(dir)
	for round := 0; round < 6; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "STORE_TEST_WRITER="+dir)
		require.NoError(t, cmd.Start())
		// list (and so build caches) while the writer writes
		deadline := time.Now().Add(time.Duration(150+round*47) * time.Millisecond)
		for time.Now().Before(deadline) {
			_, err := s.ListCached()
			require.NoError(t, err)
		}
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		requireListed(t, s, fmt.Sprintf("round %d, after kill -9", round))
		requireListed(t, s, fmt.Sprintf("round %d, again", round))
	}
	// leftovers of killed cache builders are only temporary files
	m, _ := filepath.Glob(filepath.Join(s.Dir(), "*"))
	for _, f := range m {
		base := filepath.Base(f)
		require.Contains(t, []string{"nodes", genFile, listingFile}, base)
	}
}

// A record change in progress when a listing is built (its generation
// bumped, the record not yet written) never makes that listing believed,
// whether it started before the listing read the records or while it did.
func TestListCachedNeverSavesAroundAChangeInProgress(t *testing.T) {
	s := New(t.TempDir())
	n := Node{ID: NewID(), Format: FormatVHD, VDI: &VDI{Name: "before"}}
	require.NoError(t, s.Put(n))
	changeByHand := func(name string) {
		// what Put does after its generation bump, minus the bump
		n.VDI.Name = name
		b, err := json.Marshal(n)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(s.recordPath(n.ID), b, 0o600))
	}

	done, err := s.beginChange()
	require.NoError(t, err)
	requireListed(t, s, "while a change is in progress")
	require.False(t, s.ListingCurrent(), "no cache saved while a writer holds the generation")
	changeByHand("during")
	done()
	requireListed(t, s, "after the change")

	duringListingBuild = func() {
		duringListingBuild = nil
		done, err := s.beginChange()
		require.NoError(t, err)
		changeByHand("while listing")
		done()
	}
	t.Cleanup(func() { duringListingBuild = nil })
	require.NoError(t, s.Put(n)) // make the cache stale
	got, err := s.ListCached()
	require.NoError(t, err)
	require.Len(t, got, 1)
	require.False(t, s.ListingCurrent(), "a listing read while a change was made is not believed")
	got, err = s.ListCached()
	require.NoError(t, err)
	require.Equal(t, "while listing", got[0].VDI.Name)
}

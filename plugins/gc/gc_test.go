package gc

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/vhd"
)

const size = 4 << 20

type tree struct {
	t  *testing.T
	st store.Store
	c  *Collector
	// pause model: which images are paused now, every pause asked for
	paused, asked []string
	refuse        bool // every pause fails, as with a hung tapdisk
}

func newTree(t *testing.T) *tree {
	st := store.New(t.TempDir())
	// what SR.attach makes once the SR is mounted (plugins/lock creates no
	// directories)
	require.NoError(t, os.MkdirAll(st.Path("locks"), 0o700))
	log := logrus.New()
	log.SetOutput(io.Discard)
	tr := &tree{t: t, st: st}
	tr.c = &Collector{Store: st, Images: image.Files{}, Log: log, SRLock: st.Path("locks", "sr.lock")}
	tr.c.Pause = func(ctx context.Context, paths ...string) (func(context.Context) error, int, error) {
		tr.asked = append(tr.asked, paths...)
		if tr.refuse {
			return nil, 0, errors.New("tapdisk did not pause")
		}
		tr.paused = append(tr.paused, paths...)
		return func(context.Context) error { tr.paused = nil; return nil }, len(paths), nil
	}
	return tr
}

// node makes an image (on top of parent's, if any) and its record.
func (tr *tree) node(parent *store.Node, vdi bool) store.Node {
	tr.t.Helper()
	n := store.Node{ID: store.NewID(), Format: store.FormatVHD, VirtualSize: size}
	if vdi {
		n.VDI = &store.VDI{Name: "v", Keys: map[string]string{}}
	}
	var err error
	if parent == nil {
		err = image.Files{}.Create(context.Background(), tr.st.ImagePath(n), size)
	} else {
		n.Parent = parent.ID
		err = image.Files{}.Snapshot(context.Background(), tr.st.ImagePath(n), tr.st.ImagePath(*parent))
	}
	require.NoError(tr.t, err)
	require.NoError(tr.t, tr.st.Put(n))
	return n
}

func (tr *tree) write(n store.Node, off int64) []byte {
	tr.t.Helper()
	img, err := vhd.Open(tr.st.ImagePath(n), true)
	require.NoError(tr.t, err)
	defer img.Close()
	b := make([]byte, 512)
	_, _ = rand.Read(b)
	_, err = img.WriteAt(b, off)
	require.NoError(tr.t, err)
	return b
}

func (tr *tree) read(n store.Node) []byte {
	tr.t.Helper()
	c, err := vhd.OpenChain(tr.st.ImagePath(n))
	require.NoError(tr.t, err)
	defer c.Close()
	out := make([]byte, size)
	_, err = c.ReadAt(out, 0)
	require.NoError(tr.t, err)
	return out
}

func (tr *tree) depth(n store.Node) int {
	c, err := vhd.OpenChain(tr.st.ImagePath(n))
	require.NoError(tr.t, err)
	defer c.Close()
	return len(c.Images)
}

func (tr *tree) run() {
	tr.t.Helper()
	for i := 0; i < 20; i++ {
		changed, err := tr.c.Pass(context.Background())
		require.NoError(tr.t, err)
		if !changed {
			return
		}
	}
	tr.t.Fatal("the GC never settles")
}

// A VDI's leaf alone on a hidden parent is coalesced into it with the
// leaf's tapdisk paused; the parent's file takes the leaf's name, is no
// longer hidden, and the record loses its parent.
func TestLeafCoalescePausesTheLeafAndKeepsItsName(t *testing.T) {
	tr := newTree(t)
	base := tr.node(nil, false)
	tr.write(base, 0)
	leaf := tr.node(&base, true)
	tr.write(leaf, 512)
	want := tr.read(leaf)
	tr.run()
	assert.Equal(t, []string{tr.st.ImagePath(leaf)}, tr.asked)
	assert.Empty(t, tr.paused, "resumed")
	n, err := tr.st.Get(leaf.ID)
	require.NoError(t, err)
	assert.Empty(t, n.Parent)
	_, err = tr.st.Get(base.ID)
	assert.ErrorIs(t, err, store.ErrNotFound)
	_, err = os.Stat(tr.st.ImagePath(base))
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.Equal(t, 1, tr.depth(leaf))
	img, err := vhd.Open(tr.st.ImagePath(leaf), false)
	require.NoError(t, err)
	assert.False(t, img.Info().Hidden, "a VDI's leaf is not hidden")
	img.Close()
	assert.True(t, bytes.Equal(want, tr.read(leaf)))
}

// A leaf whose tapdisk will not pause is skipped (journal dropped, nothing
// changed) and tried again by the next round.
func TestLeafWhoseTapdiskWillNotPauseIsSkippedThenRetried(t *testing.T) {
	tr := newTree(t)
	base := tr.node(nil, false)
	leaf := tr.node(&base, true)
	tr.write(leaf, 4096)
	tr.refuse = true
	tr.run()
	assert.Equal(t, 2, tr.depth(leaf))
	_, err := os.Stat(tr.c.journalPath())
	assert.ErrorIs(t, err, os.ErrNotExist)
	tr.refuse = false
	tr.run()
	assert.Equal(t, 2, tr.depth(leaf), "skipped for the rest of this round")
	tr.c.skipped = nil // a new round (Run does this after each interval)
	tr.run()
	assert.Equal(t, 1, tr.depth(leaf))
}

// Re-parenting after a coalesce pauses the VMs reading through each
// child: a VDI child itself, and every VDI below a hidden child.
func TestReparentPausesTheLeavesBelow(t *testing.T) {
	tr := newTree(t)
	b1 := tr.node(nil, false)
	b2 := tr.node(&b1, false)
	a := tr.node(&b2, true)
	b3 := tr.node(&b2, false)
	c := tr.node(&b3, true)
	d := tr.node(&b3, true)
	tr.write(a, 0)
	tr.write(c, 8192)
	wantA, wantC, wantD := tr.read(a), tr.read(c), tr.read(d)
	tr.c.Pause = func(ctx context.Context, paths ...string) (func(context.Context) error, int, error) {
		sorted := append([]string(nil), paths...)
		sort.Strings(sorted)
		tr.asked = append(tr.asked, filepath.Join(sorted...))
		return func(context.Context) error { return nil }, 0, nil
	}
	tr.run()
	pc := []string{tr.st.ImagePath(c), tr.st.ImagePath(d)}
	sort.Strings(pc)
	assert.Contains(t, tr.asked, tr.st.ImagePath(a), "child A (a VDI) paused for its re-parent")
	assert.Contains(t, tr.asked, filepath.Join(pc...), "hidden child b3: both VDIs below it paused together")
	assert.Equal(t, wantA, tr.read(a))
	assert.Equal(t, wantC, tr.read(c))
	assert.Equal(t, wantD, tr.read(d))
	assert.Equal(t, 2, tr.depth(a), "b2 coalesced into b1")
	assert.Equal(t, 3, tr.depth(c))
}

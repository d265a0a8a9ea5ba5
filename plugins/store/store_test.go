package store

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPutGetListDelete(t *testing.T) {
	s := New(t.TempDir())
	l, err := s.List()
	require.NoError(t, err)
	assert.Empty(t, l)

	id := NewID()
	require.True(t, ValidID(id))
	n := Node{ID: id, Format: FormatVHD, VirtualSize: 1 << 20, VDI: &VDI{Name: "d", Keys: map[string]string{"a": "b"}}}
	require.NoError(t, s.Put(n))
	got, err := s.Get(id)
	require.NoError(t, err)
	assert.Equal(t, "d", got.VDI.Name)
	assert.Equal(t, Schema, got.Schema)
	assert.Equal(t, filepath.Join(s.SR, id+".vhd"), s.ImagePath(got))

	l, err = s.List()
	require.NoError(t, err)
	assert.Len(t, l, 1)

	require.NoError(t, s.Delete(id))
	require.NoError(t, s.Delete(id), "idempotent")
	_, err = s.Get(id)
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = s.Get("../../etc/passwd")
	assert.ErrorIs(t, err, ErrNotFound, "keys cannot escape the SR")
}

func TestListFailsWhenSRIsGoneOrDamaged(t *testing.T) {
	_, err := New(filepath.Join(t.TempDir(), "not-mounted")).List()
	assert.ErrorIs(t, err, ErrUnreadable)

	s := New(t.TempDir())
	require.NoError(t, s.Put(Node{ID: NewID(), Format: FormatVHD}))
	require.NoError(t, os.WriteFile(filepath.Join(s.Dir(), "nodes", NewID()+".json"), []byte("{tor"), 0o600))
	_, err = s.List()
	assert.ErrorIs(t, err, ErrCorrupt, "one bad record fails the listing instead of hiding a VDI")
}

// The helper process rewrites records as fast as it can until killed.
func TestMain(m *testing.M) {
	if dir := os.Getenv("STORE_TEST_WRITER"); dir != "" {
		// Fixed valid ids (Put refuses others), rewritten again and again,
		// one deleted and recreated.
		s := New(dir)
		for i := 0; ; i++ {
			for k := 0; k < 4; k++ {
				_ = s.Put(Node{ID: fmt.Sprintf("00000000-0000-4000-8000-%012d", k), Format: FormatVHD, VirtualSize: int64(i),
					VDI: &VDI{Name: strings.Repeat("x", i%3000)}})
			}
			if i%2 == 0 {
				_ = s.Delete(fmt.Sprintf("00000000-0000-4000-8000-%012d", 3))
			}
		}
	}
	os.Exit(m.Run())
}

func TestRecordsSurviveKill9(t *testing.T) {
	dir := t.TempDir()
	for round := 0; round < 5; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "STORE_TEST_WRITER="+dir)
		require.NoError(t, cmd.Start())
		for start := time.Now(); time.Since(start) < 20*time.Second; time.Sleep(5 * time.Millisecond) {
			if m, _ := filepath.Glob(filepath.Join(dir, MetaDir, "nodes", "*.json")); len(m) > 0 {
				break // the writer is running (process start-up varies with load)
			}
		}
		time.Sleep(time.Duration(50+round*37) * time.Millisecond)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		nodes, err := New(dir).List()
		require.NoError(t, err, "round %d: every record readable after kill -9", round)
		require.NotEmpty(t, nodes, "round %d: the writer wrote records", round)
		for _, n := range nodes {
			assert.Len(t, n.VDI.Name, int(n.VirtualSize%3000), "record %s is internally consistent", n.ID)
		}
	}
}

// Issue 13 item 4: a record with "format":"vhd/../../../../tmp/x" made
// Volume.destroy delete a file outside the SR. Every field that becomes a
// path is checked when the record is read.
func TestGetRefusesHostileRecords(t *testing.T) {
	s := New(t.TempDir())
	id := NewID()
	for _, rec := range []string{
		`{"schema":1,"id":"%s","format":"vhd/../../../../tmp/x","virtual_size":1}`,
		`{"schema":1,"id":"%s","format":"raw","virtual_size":1}`,
		`{"schema":1,"id":"%s","format":"vhd","parent":"../../etc/passwd","virtual_size":1}`,
		`{"schema":1,"id":"%s","format":"vhd","parent":"` + id + `","virtual_size":1}`,
		`{"schema":1,"id":"%s","format":"vhd","virtual_size":-1}`,
	} {
		require.NoError(t, os.MkdirAll(filepath.Join(s.Dir(), "nodes"), 0o700))
		require.NoError(t, os.WriteFile(filepath.Join(s.Dir(), "nodes", id+".json"), []byte(fmt.Sprintf(rec, id)), 0o600))
		_, err := s.Get(id)
		require.ErrorIs(t, err, ErrCorrupt, rec)
		assert.Contains(t, err.Error(), id+".json", "the error names the file")
		_, err = s.List()
		assert.ErrorIs(t, err, ErrCorrupt, rec)
	}
	for _, bad := range []string{"a1", "../x", strings.ToUpper(id), id + "x", "-" + id[1:]} {
		assert.False(t, ValidID(bad), bad)
	}
	assert.Error(t, s.Put(Node{ID: NewID(), Format: "vhd/../x"}), "nothing writes such a record either")
}

func TestJournalPending(t *testing.T) {
	st := New(t.TempDir())
	pending, err := st.JournalPending()
	require.NoError(t, err)
	assert.False(t, pending, "no journal directory: nothing pending")
	require.NoError(t, os.MkdirAll(st.JournalDir(), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(st.JournalDir(), ".snapshot-x.json.tmp123"), nil, 0o600))
	pending, err = st.JournalPending()
	require.NoError(t, err)
	assert.False(t, pending, "a temporary file of an unfinished write is not a journal")
	require.NoError(t, os.WriteFile(filepath.Join(st.JournalDir(), "snapshot-x.json"), []byte("{}"), 0o600))
	pending, err = st.JournalPending()
	require.NoError(t, err)
	assert.True(t, pending)
}

package main

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/vhd"
)

// These tests run the built fake with the "socket" backend (image drivers
// in the fake tapdisk, NBD on a unix socket, no kernel device, no root)
// and check what a live snapshot relies on: the image stays open across a
// rename, pause holds I/O, unpause -a moves the device to another file.

var fakeBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tapctl-test")
	if err != nil {
		panic(err)
	}
	fakeBin = filepath.Join(dir, "tap-ctl")
	cmd := exec.Command("go", "build", "-o", fakeBin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type fake struct {
	t     *testing.T
	state string
	pid   string
	minor string
}

func newFake(t *testing.T) *fake {
	f := &fake{t: t, state: t.TempDir()}
	t.Cleanup(func() {
		b, _ := os.ReadFile(filepath.Join(f.state, "state.json"))
		var pid int
		if i := strings.Index(string(b), `"tapdisks": [`); i >= 0 {
			fmt.Sscan(strings.TrimSpace(string(b[i+len(`"tapdisks": [`):])), &pid)
		}
		if pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return f
}

// run runs tap-ctl and returns stdout, stderr and the exit code.
func (f *fake) run(args ...string) (string, string, int) {
	cmd := exec.Command(fakeBin, args...)
	cmd.Env = append(os.Environ(), "TAPCTL_FAKE_STATE="+f.state, "TAPCTL_FAKE_BACKEND=socket",
		"TAPCTL_FAKE_DEVDIR="+filepath.Join(f.state, "dev"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(f.t, err)
	}
	return out.String(), errb.String(), code
}

func (f *fake) must(args ...string) string {
	f.t.Helper()
	out, errs, code := f.run(args...)
	require.Equal(f.t, 0, code, "tap-ctl %v: %s", args, errs)
	return strings.TrimSpace(out)
}

// open serves typ:path on a new tapdisk and returns an NBD client on it.
func (f *fake) open(typ, path string) *nbdClient {
	f.pid = f.must("spawn")
	f.minor = strings.TrimPrefix(f.must("allocate"), filepath.Join(f.state, "dev", "tapdev"))
	f.must("attach", "-p", f.pid, "-m", f.minor)
	f.must("open", "-p", f.pid, "-m", f.minor, "-a", typ+":"+path)
	return f.client()
}

func (f *fake) client() *nbdClient {
	var n int
	fmt.Sscan(f.minor, &n)
	c, err := dialNBD(nbdSocket2(f.state, n))
	require.NoError(f.t, err)
	return c
}

func nbdSocket2(state string, n int) string {
	return filepath.Join(state, fmt.Sprintf("nbd%d.sock", n))
}

func (f *fake) close(c *nbdClient) {
	c.Close()
	f.must("close", "-p", f.pid, "-m", f.minor)
	f.must("detach", "-p", f.pid, "-m", f.minor)
	f.must("free", "-m", f.minor)
	assert.Equal(f.t, "", f.must("list"))
}

func sum(t *testing.T, path string) [32]byte {
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return sha256.Sum256(b)
}

type format struct {
	typ      string
	create   func(t *testing.T, path string, size int64)
	snapshot func(t *testing.T, child, parent string)
	readAll  func(t *testing.T, path string) []byte // an independent reader of the chain
}

var formats = []format{
	{typ: "vhd",
		create: func(t *testing.T, p string, size int64) { require.NoError(t, vhd.Create(p, size, vhd.CreateOptions{})) },
		snapshot: func(t *testing.T, child, parent string) {
			require.NoError(t, vhd.Snapshot(child, parent, vhd.CreateOptions{}))
		},
		readAll: lvioRead},
	{typ: "qcow2",
		create: func(t *testing.T, p string, size int64) {
			runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", p, fmt.Sprint(size))
		},
		snapshot: func(t *testing.T, child, parent string) {
			runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", parent, child)
		},
		readAll: func(t *testing.T, p string) []byte {
			out := filepath.Join(t.TempDir(), "raw")
			runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", p, out)
			b, err := os.ReadFile(out)
			require.NoError(t, err)
			return b
		}},
}

func runTool(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
}

// lvioRead reads a VHD chain with blktap's own libvhd (lvio, built from
// the blktap XCP-ng ships), independent of plugins/vhd.
func lvioRead(t *testing.T, p string) []byte {
	lvio, err := filepath.Abs("../../../../shared/dom0/blktap/bin/lvio")
	require.NoError(t, err)
	if _, err := os.Stat(lvio); err != nil {
		testenv.Unavailable(t, "blktap's lvio (../shared/dom0): "+err.Error())
	}
	out := filepath.Join(t.TempDir(), "raw")
	runTool(t, lvio, "read", p, out)
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	return b
}

// write writes through the device and into the shadow.
func write(t *testing.T, c *nbdClient, shadow []byte, off int64, data []byte) {
	t.Helper()
	_, err := c.WriteAt(data, off)
	require.NoError(t, err)
	copy(shadow[off:], data)
}

func readDev(t *testing.T, c *nbdClient, size int64) []byte {
	b := make([]byte, size)
	for off := int64(0); off < size; off += 1 << 20 {
		_, err := c.ReadAt(b[off:off+1<<20], off)
		require.NoError(t, err)
	}
	return b
}

func TestLiveSnapshotThroughPause(t *testing.T) {
	testenv.Tools(t, "qemu-img", "qemu-nbd")
	const size = 8 << 20
	for _, fm := range formats {
		t.Run(fm.typ, func(t *testing.T) {
			dir := t.TempDir()
			leaf := filepath.Join(dir, "leaf."+fm.typ)
			fm.create(t, leaf, size)
			f := newFake(t)
			c := f.open(fm.typ, leaf)
			shadow := make([]byte, size)
			rnd := rand.New(rand.NewSource(1))
			whole := make([]byte, 3<<20)
			rnd.Read(whole)
			write(t, c, shadow, 1<<20, whole) // fills block 0's second half and block 1

			// Pause, then the file moves: what a snapshot does.
			f.must("pause", "-p", f.pid, "-m", f.minor)
			assert.Contains(t, f.must("list"), "state=0x20 args="+fm.typ+":"+leaf)
			base := filepath.Join(dir, "base."+fm.typ)
			require.NoError(t, os.Rename(leaf, base))
			baseSum := sum(t, base)
			fm.snapshot(t, leaf, base)

			// A write issued while paused waits.
			sector := make([]byte, 512)
			rnd.Read(sector)
			done := make(chan error, 1)
			go func() { _, err := c.WriteAt(sector, 2<<20+512*7); done <- err }()
			select {
			case err := <-done:
				t.Fatalf("a write completed while the device was paused (err %v)", err)
			case <-time.After(300 * time.Millisecond):
			}
			assert.Equal(t, baseSum, sum(t, base), "nothing reached the image while paused")

			// Errors are negative errnos: exit 256-errno.
			_, errs, code := f.run("pause", "-p", f.pid, "-m", "99")
			assert.Equal(t, 256-int(syscall.ENODEV), code, errs)
			f.must("unpause", "-p", f.pid, "-m", f.minor, "-a", fm.typ+":"+leaf)
			require.NoError(t, <-done)
			copy(shadow[2<<20+512*7:], sector)
			_, errs, code = f.run("unpause", "-p", f.pid, "-m", f.minor)
			assert.Equal(t, 256-int(syscall.EINVAL), code, errs)
			assert.Contains(t, errs, "unpause failed")

			// Single sectors inside blocks the parent holds partly and
			// fully: unwritten sectors must come from the parent.
			for _, off := range []int64{512, 1<<20 + 512*3, 3<<20 + 512*100, 6 << 20} {
				rnd.Read(sector)
				write(t, c, shadow, off, sector)
			}
			assert.True(t, bytes.Equal(shadow, readDev(t, c, size)), "the device reads back the shadow")
			assert.Equal(t, baseSum, sum(t, base), "the snapshot did not change after unpause")
			f.close(c)

			assert.True(t, bytes.Equal(shadow, fm.readAll(t, leaf)), "the chain read by an independent reader equals the shadow")
			want := make([]byte, size)
			copy(want[1<<20:], whole)
			assert.True(t, bytes.Equal(want, fm.readAll(t, base)), "the base holds exactly the writes made before the pause")
		})
	}
}

// TestRenameDoesNotRedirect: like tapdisk, the fake holds the image open;
// a rename without pause leaves its writes in the renamed file (the bug
// of issue 12 that pause exists to avoid, so the fake must reproduce it).
func TestRenameDoesNotRedirect(t *testing.T) {
	testenv.Tools(t, "qemu-img", "qemu-nbd")
	for _, fm := range formats {
		t.Run(fm.typ, func(t *testing.T) {
			dir := t.TempDir()
			leaf := filepath.Join(dir, "leaf."+fm.typ)
			fm.create(t, leaf, 4<<20)
			f := newFake(t)
			c := f.open(fm.typ, leaf)
			moved := filepath.Join(dir, "moved."+fm.typ)
			require.NoError(t, os.Rename(leaf, moved))
			fm.create(t, leaf, 4<<20)
			data := bytes.Repeat([]byte{0x5a}, 4096)
			_, err := c.WriteAt(data, 8192)
			require.NoError(t, err)
			f.close(c)
			assert.Equal(t, data, fm.readAll(t, moved)[8192:8192+4096], "the write went to the open inode")
			assert.Equal(t, make([]byte, 4096), fm.readAll(t, leaf)[8192:8192+4096], "not to the new file at the path")
		})
	}
}

// TestUnpauseRefusesAnotherSize: tapdisk_vbd_resume fails with
// EMEDIUMTYPE when the image's size changed, and the device stays paused.
func TestUnpauseRefusesAnotherSize(t *testing.T) {
	testenv.Tools(t, "qemu-img", "qemu-nbd")
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.vhd"), filepath.Join(dir, "b.vhd")
	require.NoError(t, vhd.Create(a, 4<<20, vhd.CreateOptions{}))
	require.NoError(t, vhd.Create(b, 6<<20, vhd.CreateOptions{}))
	f := newFake(t)
	c := f.open("vhd", a)
	f.must("pause", "-p", f.pid, "-m", f.minor)
	f.must("pause", "-p", f.pid, "-m", f.minor) // pausing twice is fine
	_, errs, code := f.run("unpause", "-p", f.pid, "-m", f.minor, "-a", "vhd:"+b)
	assert.Equal(t, 256-int(syscall.EMEDIUMTYPE), code, errs)
	assert.Contains(t, f.must("list"), "state=0x220 args=vhd:"+a)
	f.must("unpause", "-p", f.pid, "-m", f.minor)
	assert.Contains(t, f.must("list"), "state=0 args=vhd:"+a)
	f.close(c)
}

// TestReaderTakesNoLocks: tapdisk takes no image locks, so a read-only
// device (a backup attached in dom0) must not stop a commit into the base
// its chain shares (qemu-nbd would lock it by default).
func TestReaderTakesNoLocks(t *testing.T) {
	testenv.Tools(t, "qemu-img", "qemu-nbd")
	dir := t.TempDir()
	base, snap, leaf := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "snap.qcow2"), filepath.Join(dir, "leaf.qcow2")
	formats[1].create(t, base, 4<<20)
	formats[1].snapshot(t, snap, base)
	formats[1].snapshot(t, leaf, base)
	f := newFake(t)
	f.pid = f.must("spawn")
	f.minor = strings.TrimPrefix(f.must("allocate"), filepath.Join(f.state, "dev", "tapdev"))
	f.must("attach", "-p", f.pid, "-m", f.minor)
	f.must("open", "-R", "-p", f.pid, "-m", f.minor, "-a", "qcow2:"+snap)
	c := f.client()
	runTool(t, "qemu-img", "commit", "-q", leaf)
	_, err := c.WriteAt(make([]byte, 512), 0)
	assert.Error(t, err, "a read-only device refuses writes")
	f.close(c)
}

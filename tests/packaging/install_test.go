package packaging

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

// hostRoot is a scratch "dom0" for `rpm --root`: the scriptlets run chrooted
// in it, so it gets a static busybox as /bin/sh and its applets, and the
// plugin roots that the xapi-storage-script package would own.
type hostRoot struct {
	dir string
}

func newHostRoot(t *testing.T) hostRoot {
	t.Helper()
	testenv.Root(t)
	tools := testenv.Tools(t, "busybox", "rpm")
	bb := tools["busybox"]
	f, err := elf.Open(bb)
	require.NoError(t, err)
	interp := false
	for _, p := range f.Progs {
		interp = interp || p.Type == elf.PT_INTERP
	}
	f.Close()
	if interp {
		testenv.Unavailable(t, bb+" is not static (install busybox-static)")
	}

	r := hostRoot{dir: t.TempDir()}
	for _, d := range []string{"bin", "usr/bin", "tmp", "var/tmp", "var/run/sr-mount", pluginRoot[1:] + "/volume", pluginRoot[1:] + "/datapath"} {
		require.NoError(t, os.MkdirAll(filepath.Join(r.dir, d), 0o755))
	}
	b, err := os.ReadFile(bb)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(r.dir, "bin/busybox"), b, 0o755))
	list, err := exec.Command(bb, "--list").Output()
	require.NoError(t, err)
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.ContainsAny(applet, "[]") {
			continue
		}
		require.NoError(t, os.Symlink("busybox", filepath.Join(r.dir, "bin", applet)))
	}
	// Scriptlets redirect to /dev/null, as on any host.
	require.NoError(t, os.MkdirAll(r.path("dev"), 0o755))
	require.NoError(t, syscall.Mknod(r.path("dev/null"), syscall.S_IFCHR|0o666, 1<<8|3), "mknod /dev/null in the scratch root")
	require.NoError(t, os.Chmod(r.path("dev/null"), 0o666))
	r.rpm(t, true, "--initdb")
	return r
}

// rpm runs rpm against the scratch root and returns its combined output.
func (r hostRoot) rpm(t *testing.T, mustSucceed bool, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("rpm", append([]string{"--root", r.dir}, args...)...)
	out, err := cmd.CombinedOutput()
	if mustSucceed {
		require.NoError(t, err, "rpm %v:\n%s", args, out)
	}
	return string(out), err
}

func (r hostRoot) path(p string) string { return filepath.Join(r.dir, p) }

func (r hostRoot) exists(p string) bool {
	_, err := os.Lstat(r.path(p))
	return err == nil
}

// watchDir records inotify events in dir (non-recursive, like
// xapi-storage-script's watch on datapath/).
type watchDir struct{ fd int }

type dirEvent struct {
	mask uint32
	name string
}

func newWatch(t *testing.T, dir string) watchDir {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_NONBLOCK | syscall.IN_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { syscall.Close(fd) })
	_, err = syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE|syscall.IN_DELETE|syscall.IN_MOVED_TO|syscall.IN_MOVED_FROM)
	require.NoError(t, err)
	return watchDir{fd: fd}
}

func (w watchDir) drain(t *testing.T) []dirEvent {
	t.Helper()
	var out []dirEvent
	buf := make([]byte, 64*1024)
	for {
		n, err := syscall.Read(w.fd, buf)
		if err == syscall.EAGAIN || n <= 0 {
			return out
		}
		require.NoError(t, err)
		for off := 0; off+syscall.SizeofInotifyEvent <= n; {
			ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := buf[off+syscall.SizeofInotifyEvent : off+syscall.SizeofInotifyEvent+int(ev.Len)]
			out = append(out, dirEvent{mask: ev.Mask, name: string(bytes.TrimRight(name, "\x00"))})
			off += syscall.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// Install, reinstall (upgrade path) and erase the real RPM with the real
// rpm into a scratch root, scriptlets included, and check what the storage
// daemon's inotify watch on datapath/ would see.
func TestRPMInstallScriptletsInScratchRoot(t *testing.T) {
	pkg, _ := builtRPM(t)
	r := newHostRoot(t)
	dp := r.path(pluginRoot + "/datapath")
	w := newWatch(t, dp)

	// --nodeps: the scratch root has no cryptsetup, blktap, ... packages.
	out, _ := r.rpm(t, true, "-i", "--nodeps", pkg)
	assert.Contains(t, out, "xe-toolstack-restart", "the admin must be told what remains to do")
	for _, p := range []string{volumeDir + "/Plugin.Query", datapathDir + "/Plugin.Query", datapathDir + "/Datapath.attach", "/usr/libexec/luksext/uninstall-check", "/etc/sysconfig/luksext"} {
		assert.True(t, r.exists(p), p)
	}
	sysconfig, err := os.ReadFile(r.path("/etc/sysconfig/luksext"))
	require.NoError(t, err)
	assert.Contains(t, string(sysconfig), "\nLOG_LEVEL=info\n")

	// %posttrans pokes datapath/ after every file is in place: an entry is
	// created and removed there after the plugin directory appeared, and
	// nothing is left behind.
	events := w.drain(t)
	pluginAt, pokeAt, pokeGone := -1, -1, -1
	for i, e := range events {
		switch {
		case e.name == "luksext" && e.mask&(syscall.IN_CREATE|syscall.IN_MOVED_TO) != 0:
			pluginAt = i
		case strings.HasPrefix(e.name, ".luksext-rescan.") && e.mask&syscall.IN_CREATE != 0:
			pokeAt = i
		case strings.HasPrefix(e.name, ".luksext-rescan.") && e.mask&syscall.IN_DELETE != 0:
			pokeGone = i
		}
	}
	require.GreaterOrEqual(t, pluginAt, 0, "datapath/luksext never appeared: %+v", events)
	assert.Greater(t, pokeAt, pluginAt, "rescan poke must follow the plugin directory: %+v", events)
	assert.Greater(t, pokeGone, pokeAt, "rescan entry must be removed: %+v", events)
	entries, err := os.ReadDir(dp)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	assert.Equal(t, "luksext", entries[0].Name())

	// An attached luksext SR on this host: a reinstall (upgrade path) goes
	// through, an erase is refused and leaves every file in place.
	sr := "/var/run/sr-mount/0f3c6d0e-7d55-4c36-9f3e-2b3a4cde1f00"
	require.NoError(t, os.MkdirAll(r.path(sr), 0o755))
	require.NoError(t, os.WriteFile(r.path(sr+"/luksext-sr.json"), []byte(`{"schema":1}`), 0o644))
	r.rpm(t, true, "--reinstall", "--nodeps", pkg)
	out, err = r.rpm(t, false, "-e", "luksext")
	require.Error(t, err, "erase must be refused while an SR is attached:\n%s", out)
	assert.Contains(t, out, "REFUSING")
	assert.Contains(t, out, filepath.Base(sr))
	assert.Contains(t, out, "rpm -e --nopreun luksext")
	assert.True(t, r.exists(datapathDir+"/Plugin.Query"))
	assert.True(t, r.exists("/usr/libexec/luksext/volume"))

	// Detached, but xapi still knows a luksext SR: erase proceeds, loudly.
	require.NoError(t, os.RemoveAll(r.path(sr)))
	xe := "#!/bin/sh\n[ \"$1 $2\" = 'sr-list type=luksext' ] && echo 0f3c6d0e-7d55-4c36-9f3e-2b3a4cde1f00,11111111-2222-3333-4444-555555555555\n"
	require.NoError(t, os.WriteFile(r.path("/usr/bin/xe"), []byte(xe), 0o755))
	out, _ = r.rpm(t, true, "-e", "luksext")
	assert.Contains(t, out, "WARNING")
	assert.Contains(t, out, "11111111-2222-3333-4444-555555555555")
	for _, p := range []string{volumeDir, datapathDir, "/usr/libexec/luksext"} {
		assert.False(t, r.exists(p), "%s left behind after erase", p)
	}
	// The watched roots belong to xapi-storage-script and must survive.
	assert.True(t, r.exists(pluginRoot+"/volume"))
	assert.True(t, r.exists(pluginRoot+"/datapath"))
}

// A clean host (no SR, xapi answering with none): erase is silent and
// succeeds.
func TestRPMEraseWithoutSRs(t *testing.T) {
	pkg, _ := builtRPM(t)
	r := newHostRoot(t)
	require.NoError(t, os.WriteFile(r.path("/usr/bin/xe"), []byte("#!/bin/sh\necho\n"), 0o755))
	r.rpm(t, true, "-i", "--nodeps", pkg)
	out, _ := r.rpm(t, true, "-e", "luksext")
	assert.NotContains(t, out, "WARNING")
	assert.NotContains(t, out, "REFUSING")
	assert.False(t, r.exists(volumeDir))
}

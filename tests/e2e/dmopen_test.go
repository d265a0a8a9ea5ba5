package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/tests/vm"
)

const srDM = "d3ad0000-1b1e-4c4d-9d5e-2a7f0c1e8b15"

// TestDMOpenCrashAndNoUdev proves issue 15's promises for SR.attach's
// device-mapper open (plugins/luks open_dm.go) on the installed binary,
// in one guest:
//
//   - kill -9 of SR.attach between its DM_DEV_CREATE and DM_TABLE_LOAD
//     ioctls (device created, no table) and between DM_TABLE_LOAD and
//     DM_DEV_SUSPEND (resume: table loaded, not live), held there by
//     strace and killed when dmsetup shows that state. A plain rerun of
//     SR.attach (same argv, same stdin) converges, SR.ls works, SR.detach
//     leaves nothing; an SR.detach instead of the rerun converges too;
//     the killed run's udev cookie semaphore does not outlive the next
//     attach or detach.
//   - udevd stopped: SR.attach makes /dev/mapper/<name> itself, cryptsetup
//     and `luksext status` see the mapping, SR.detach removes mapping and
//     node, a rerun converges; udev back, attach/detach as usual.
func TestDMOpenCrashAndNoUdev(t *testing.T) {
	testenv.Tools(t, "strace")
	g := bootGuest(t, vm.Config{Disks: []int64{40 << 20}, TPM: true})
	g.startXAPI(t, map[string]string{})
	var cfg map[string]string
	g.ok(t, "SR.create", createParams(srDM, map[string]string{"device": "/dev/vda"}), &cfg)
	mnt := "/var/run/sr-mount/" + srDM
	detach := map[string]any{"dbg": "t", "sr": mnt}
	g.ok(t, "SR.detach", detach, nil)
	name := luks.SRName(srDM)

	params, err := json.Marshal(attachParams(cfg))
	require.NoError(t, err)
	in := filepath.Join(g.work, "params-killed-attach.json")
	require.NoError(t, os.WriteFile(in, params, 0o600))
	// probe reads, in one guest round trip, what device-mapper, the
	// mount table, /dev/mapper and SysV IPC say.
	probe := func(t *testing.T) dmState {
		t.Helper()
		out := g.MustRun(t, fmt.Sprintf(`echo "==dm"; dmsetup info %[1]s 2>&1
echo "==mnt"; findmnt -n %[2]s >/dev/null && echo yes || echo no
echo "==node"; stat -c '%%F' /dev/mapper/%[1]s 2>/dev/null; ls /dev/mapper | grep luksext
echo "==cookies"; ipcs -s | awk '$1 ~ /^0x0d4d/ {print $1, $2}'`, name, mnt))
		var st dmState
		for _, part := range strings.Split(out, "==")[1:] {
			k, v, _ := strings.Cut(part, "\n")
			switch k {
			case "dm":
				st.DM = v
			case "mnt":
				st.Mounted = strings.TrimSpace(v) == "yes"
			case "node":
				st.Node = v
			case "cookies":
				st.Cookies = v
			}
		}
		return st
	}
	attached := func(t *testing.T) dmState {
		t.Helper()
		st := probe(t)
		assert.Regexp(t, `Tables present: +LIVE`, st.DM)
		assert.Regexp(t, `State: +ACTIVE`, st.DM)
		assert.True(t, st.Mounted, "mounted")
		return st
	}
	detached := func(t *testing.T) dmState {
		t.Helper()
		g.ok(t, "SR.detach", detach, nil)
		st := probe(t)
		assert.Contains(t, st.DM, "Device does not exist", "no device-mapper device left")
		assert.Equal(t, "", st.Node, "no node left")
		assert.False(t, st.Mounted, "unmounted")
		return st
	}

	// killAttach runs the installed SR.attach as xapi-storage-script
	// does, under strace, which holds each of its device-mapper ioctls
	// (only those: -P /dev/mapper/control) at its entry for a while, and
	// kills it with SIGKILL as soon as dmsetup shows the device in state
	// (its "Tables present"): the process is then inside the open, before
	// the next ioctl. strace's own when=N injection cannot pick the ioctl
	// here: it counts per thread, and the Go runtime spreads one open's
	// ioctls over several threads (create, load and resume each on
	// another in a first trace). The trace shows the ioctls undecoded (a
	// table load's arguments would print the key).
	killAttach := func(t *testing.T, state string) (trace string) {
		t.Helper()
		tf := filepath.Join(g.work, "trace-kill")
		out := g.MustRun(t, fmt.Sprintf(`export LUKSEXT_XAPI_SOCKET=/run/fakexapi.sock LUKSEXT_LOG_LEVEL=debug
strace -f -b execve -qq -o %[1]s -e trace=ioctl -e raw=ioctl -e signal=none -P /dev/mapper/control -e inject=ioctl:delay_enter=1000000 \
	%[2]s/SR.attach --json <%[3]s >%[4]s/stdout-killed.json 2>>%[4]s/plugin-stderr.log &
spid=$!
for i in $(seq 1200); do
	if dmsetup info %[5]s 2>/dev/null | grep -Eq 'Tables present: +%[6]s$'; then kill -9 $(pgrep -P $spid); break; fi
	kill -0 $spid 2>/dev/null || break
	sleep 0.02
done
wait $spid; echo "EXIT=$?"`, tf, g.volume, in, g.work, name, state))
		require.Contains(t, out, "EXIT=137", "SR.attach killed while the device was %s", state)
		b, err := os.ReadFile(tf)
		require.NoError(t, err)
		return string(b)
	}

	for _, tc := range []struct {
		state        string // dmsetup info's "Tables present" at the kill
		done, undone uint64 // the ioctls the killed run had and had not completed
		then         string // SR.attach or SR.detach
	}{
		{"None", unix.DM_DEV_CREATE, unix.DM_TABLE_LOAD, "SR.attach"},
		{"INACTIVE", unix.DM_TABLE_LOAD, unix.DM_DEV_SUSPEND, "SR.attach"},
		{"INACTIVE", unix.DM_TABLE_LOAD, unix.DM_DEV_SUSPEND, "SR.detach"},
	} {
		t.Run(fmt.Sprintf("kill -9 with the table %s, then %s", tc.state, tc.then), func(t *testing.T) {
			before := probe(t).Cookies
			trace := killAttach(t, tc.state)
			assert.True(t, ioctlDone(trace, tc.done), "the killed run completed %#x:\n%s", tc.done, trace)
			assert.False(t, ioctlDone(trace, tc.undone), "the killed run did not complete %#x:\n%s", tc.undone, trace)
			st := probe(t)
			t.Logf("after the kill:\n%s\nudev cookies: %q (before: %q)", st.DM, st.Cookies, before)
			require.Regexp(t, "Tables present: +"+tc.state, st.DM, "the half-made device")
			require.False(t, st.Mounted)

			if tc.then == "SR.attach" {
				var sr string
				g.ok(t, "SR.attach", attachParams(cfg), &sr) // the killed run's params
				assert.Equal(t, mnt, sr)
				st = attached(t)
				var vols []smapi.Volume
				g.ok(t, "SR.ls", map[string]any{"dbg": "t", "sr": mnt}, &vols)
				assert.Equal(t, before, st.Cookies, "the killed run's udev cookie is gone after the rerun")
				detached(t)
			} else {
				st = detached(t)
				assert.Equal(t, before, st.Cookies, "the killed run's udev cookie is gone after the detach")
			}
		})
	}

	t.Run("udev not running", func(t *testing.T) {
		// The state libdevmapper and the plugin detect as "udev not
		// running" (libudev's udev_queue_get_udev_is_active: no
		// /run/udev/control). udevd is stopped; the socket it bound is
		// removed if it stays behind.
		out := g.MustRun(t, `udevadm control --exit
for i in $(seq 100); do pgrep -x systemd-udevd >/dev/null || break; sleep 0.1; done
if pgrep -x systemd-udevd; then echo "udevd still runs"; exit 1; fi
ls -l /run/udev/control 2>&1; rm -f /run/udev/control`)
		t.Logf("udevd stopped; its control socket after the exit: %s", out)
		defer g.MustRun(t, "[ -e /run/udev/control ] || /lib/systemd/systemd-udevd --daemon --resolve-names=never")
		logBefore := pluginLogSize(t, g)
		for range 2 {
			var sr string
			g.ok(t, "SR.attach", attachParams(cfg), &sr)
			assert.Equal(t, mnt, sr)
		}
		assert.Equal(t, 1, strings.Count(pluginLogSince(t, g, logBefore), "created the device-mapper node (udev is not running)"),
			"the first attach made the node, the rerun found it")
		out = g.MustRun(t, fmt.Sprintf("cryptsetup status %s; echo ==; %s/root/usr/sbin/luksext status %s", name, g.work, srDM))
		assert.Contains(t, out, "is active and is in use")
		assert.Contains(t, out, "/dev/vda")
		assert.Contains(t, out, "unlocked: yes (/dev/mapper/"+name+")")
		assert.Contains(t, out, "mounted:  yes")
		st := attached(t)
		assert.True(t, strings.HasPrefix(st.Node, "block special file\n"), "the node is ours, not udev's link: %q", st.Node)
		detached(t)

		g.MustRun(t, "/lib/systemd/systemd-udevd --daemon --resolve-names=never && for i in $(seq 100); do [ -e /run/udev/control ] && exit 0; sleep 0.1; done; exit 1")
		logBefore = pluginLogSize(t, g)
		g.ok(t, "SR.attach", attachParams(cfg), nil)
		assert.NotContains(t, pluginLogSince(t, g, logBefore), "udev is not running")
		st = attached(t)
		assert.True(t, strings.HasPrefix(st.Node, "symbolic link\n"), "udev's link again: %q", st.Node)
		detached(t)
	})
}

// dmState is what the guest says about the SR's mapping.
type dmState struct {
	DM      string // dmsetup info
	Mounted bool
	Node    string // /dev/mapper/<name>'s file type, then the luksext entries of /dev/mapper
	Cookies string // libdevmapper udev cookie semaphores (key, semid)
}

// ioctlDone reports whether an `strace -e raw=ioctl` trace shows the
// ioctl req completed.
func ioctlDone(trace string, req uint64) bool {
	re := regexp.MustCompile(fmt.Sprintf(`ioctl\(0x[0-9a-f]+, %#x, .*\) = 0`, req))
	return re.MatchString(trace)
}

func pluginLogSize(t *testing.T, g *guest) int64 {
	st, err := os.Stat(filepath.Join(g.work, "plugin-stderr.log"))
	require.NoError(t, err)
	return st.Size()
}

func pluginLogSince(t *testing.T, g *guest, off int64) string {
	b, err := os.ReadFile(filepath.Join(g.work, "plugin-stderr.log"))
	require.NoError(t, err)
	return string(b[off:])
}

package luksvm

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
)

// countingRunner records which cryptsetup subcommands ran.
type countingRunner struct {
	run.Runner
	mu   sync.Mutex
	subs []string
}

func (r *countingRunner) Run(ctx context.Context, c run.Cmd) (run.Result, error) {
	if len(c.Args) > 0 {
		r.mu.Lock()
		r.subs = append(r.subs, c.Args[0])
		r.mu.Unlock()
	}
	return r.Runner.Run(ctx, c)
}

func (r *countingRunner) ran(sub string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.subs {
		if s == sub {
			return true
		}
	}
	return false
}

func (r *countingRunner) reset() { r.mu.Lock(); r.subs = nil; r.mu.Unlock() }

// dmView is what an administrator's tools see of a mapping.
type dmView struct{ table, info, status, readAhead string }

func viewOf(t *testing.T, name string) dmView {
	var info []string
	for _, l := range strings.Split(mustSh(t, "", "dmsetup", "info", name), "\n") {
		if !strings.HasPrefix(l, "Major, minor:") { // dm-N differs per create
			info = append(info, l)
		}
	}
	var status []string
	for _, l := range strings.Split(mustSh(t, "", "cryptsetup", "status", name), "\n") {
		// "device: /dev/vdc" vs "/dev/vdc" path spelling is cryptsetup's, not the table's
		status = append(status, strings.TrimSpace(l))
	}
	return dmView{
		table:     mustSh(t, "", "dmsetup", "table", "--showkeys", name),
		info:      strings.Join(info, "\n"),
		status:    strings.Join(status, "\n"),
		readAhead: mustSh(t, "", "blockdev", "--getra", "/dev/mapper/"+name),
	}
}

func sum64k(t *testing.T, path string) [32]byte {
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	buf := make([]byte, 64<<10)
	_, err = f.ReadAt(buf, 1<<20)
	require.NoError(t, err)
	return sha256.Sum256(buf)
}

// dom0Cryptsetups lists the dom0 cryptsetup builds TestVM copied next to
// the test binary (testenv.Dom0Tree), by version.
func dom0Cryptsetups(t *testing.T) map[string]string {
	exe, err := os.Executable()
	require.NoError(t, err)
	out := map[string]string{}
	for _, v := range []string{"1.7.4", "2.0.3"} {
		p := filepath.Join(filepath.Dir(exe), "dom0-cryptsetup-"+v, "sbin", "cryptsetup")
		if _, err := os.Stat(p); err == nil {
			out[v] = p
		}
	}
	return out
}

// testDMOpen: our device-mapper open of a keyslot gives the mapping
// cryptsetup gives (table with key, dmsetup info, cryptsetup status,
// read-ahead, same data), for LUKS1 and LUKS2 formatted and opened by
// Debian's cryptsetup and by dom0's 1.7.4 and 2.0.3; the mapping closes
// with cryptsetup; interrupted opens converge; what the Go path does not
// handle falls back to cryptsetup with a reason.
func testDMOpen(t *testing.T, dev string) {
	log := logrus.New()
	log.SetOutput(testWriter{t})
	log.SetLevel(logrus.DebugLevel)
	hook := test.NewLocal(log)
	cr := &countingRunner{Runner: run.NewExec(log)}
	m := luks.New(cr, log)
	ctx := context.Background()
	pw := "dm open test passphrase"
	const sr, uuid = "d1d1d1d1-0000-4000-8000-00000000dddd", "e2e2e2e2-1111-4222-8333-444444444444"
	name := luks.SRName(sr)

	type profile struct{ label, tool, luksType string }
	profiles := []profile{{"debian-luks1", "cryptsetup", "luks1"}, {"debian-luks2", "cryptsetup", "luks2"}}
	d := dom0Cryptsetups(t)
	if p, ok := d["1.7.4"]; ok {
		profiles = append(profiles, profile{"1.7.4-luks1", p, ""})
	}
	if p, ok := d["2.0.3"]; ok {
		profiles = append(profiles, profile{"2.0.3-luks2", p, "luks2"})
	}
	require.Len(t, profiles, 4, "TestVM copies both dom0 cryptsetup builds")

	for _, p := range profiles {
		t.Run(p.label, func(t *testing.T) {
			args := []string{"luksFormat", "-q", "--uuid", uuid, "--cipher", "aes-xts-plain64", "--key-size", "512"}
			if p.luksType != "" {
				args = append(args, "--type", p.luksType, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
			} else {
				args = append(args, "--iter-time", "10")
			}
			mustSh(t, pw, p.tool, append(args, "--key-file=-", dev)...)
			mustSh(t, pw, p.tool, "open", "--key-file=-", dev, name)
			mustSh(t, "", "dd", "if=/dev/urandom", "of=/dev/mapper/"+name, "bs=64k", "seek=16", "count=1", "oflag=direct", "status=none")
			want := viewOf(t, name)
			wantSum := sum64k(t, "/dev/mapper/"+name)
			mustSh(t, "", p.tool, "close", name)

			cr.reset()
			require.NoError(t, m.Open(ctx, dev, name, secret.FromString(pw), 0))
			assert.False(t, cr.ran("open"), "opened without cryptsetup")
			got := viewOf(t, name)
			assert.Equal(t, want, got)
			assert.Equal(t, wantSum, sum64k(t, "/dev/mapper/"+name), "same data through both mappings")
			t.Logf("table (key elided): %s", elideKey(got.table))
			mustSh(t, "", p.tool, "close", name) // dom0's cryptsetup closes our mapping
			_, rc := sh(t, "", "dmsetup", "info", name)
			require.NotEqual(t, 0, rc)
		})
	}

	t.Run("InterruptedOpenConverges", func(t *testing.T) {
		// The disk now holds 2.0.3's LUKS2. A kill -9 after DM_DEV_CREATE
		// leaves a device with no table; after DM_TABLE_LOAD, one with an
		// inactive table and no live one.
		dmUUID := luks.CryptUUID(2, uuid, name)
		mustSh(t, "", "dmsetup", "create", name, "--notable", "-u", dmUUID)
		require.NoError(t, m.Open(ctx, dev, name, secret.FromString(pw), 0))
		require.True(t, m.IsOpen(name))
		assert.Contains(t, mustSh(t, "", "dmsetup", "info", name), "State:             ACTIVE")
		require.NoError(t, m.Close(ctx, name))

		mustSh(t, "", "dmsetup", "create", name, "--notable", "-u", dmUUID)
		mustSh(t, "", "dmsetup", "load", name, "--table", "0 8 zero")
		assert.Contains(t, mustSh(t, "", "dmsetup", "info", name), "Tables present:    INACTIVE")
		require.NoError(t, m.Open(ctx, dev, name, secret.FromString(pw), 0))
		assert.Contains(t, mustSh(t, "", "dmsetup", "info", name), "Tables present:    LIVE")
		assert.Contains(t, mustSh(t, "", "dmsetup", "table", name), "crypt aes-xts-plain64")
		require.NoError(t, m.Close(ctx, name))

		// Close (SR.detach) instead of a rerun: the half-made device goes
		// too, though it has no /dev/mapper node.
		mustSh(t, "", "dmsetup", "create", name, "--notable", "-u", dmUUID)
		require.False(t, m.IsOpen(name))
		require.NoError(t, m.Close(ctx, name))
		mustSh(t, "", "dmsetup", "create", name, "--notable", "-u", dmUUID)
		mustSh(t, "", "dmsetup", "load", name, "--table", "0 8 zero")
		require.NoError(t, m.Close(ctx, name))
		_, rc := sh(t, "", "dmsetup", "info", name)
		require.NotEqual(t, 0, rc, "Close removed the half-made device")

		// Someone else's device of that name is left alone.
		mustSh(t, "", "dmsetup", "create", name, "--table", "0 8 zero")
		err := m.Open(ctx, dev, name, secret.FromString(pw), 0)
		require.ErrorIs(t, err, luks.ErrBusy)
		assert.Contains(t, mustSh(t, "", "dmsetup", "table", name), "zero")
		mustSh(t, "", "dmsetup", "remove", name)
		mustSh(t, "", "dmsetup", "create", name, "--notable", "-u", "someone-else")
		require.ErrorIs(t, m.Close(ctx, name), luks.ErrBusy)
		mustSh(t, "", "dmsetup", "info", name)
		mustSh(t, "", "dmsetup", "remove", name)

		// A wrong key leaves nothing behind.
		require.ErrorIs(t, m.Open(ctx, dev, name, secret.FromString("wrong"), 0), luks.ErrWrongPassphrase)
		_, rc = sh(t, "", "dmsetup", "info", name)
		require.NotEqual(t, 0, rc)
	})

	t.Run("UnhandledHeaderFallsBackToCryptsetup", func(t *testing.T) {
		mustSh(t, pw, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256",
			"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", dev)
		cr.reset()
		hook.Reset()
		require.NoError(t, m.Open(ctx, dev, name, secret.FromString(pw), 0))
		assert.True(t, cr.ran("open"), "cryptsetup opened it")
		var reason string
		for _, e := range hook.AllEntries() {
			if r, ok := e.Data["reason"]; ok {
				reason = fmt.Sprint(r)
			}
		}
		assert.Equal(t, "cipher aes-cbc-essiv:sha256", reason)
		assert.Contains(t, mustSh(t, "", "dmsetup", "table", name), "aes-cbc-essiv:sha256")
		require.NoError(t, m.Close(ctx, name))
	})
}

func elideKey(table string) string {
	f := strings.Fields(table)
	if len(f) > 4 && !strings.HasPrefix(f[4], ":") {
		f[4] = "<key>"
	}
	return strings.Join(f, " ")
}

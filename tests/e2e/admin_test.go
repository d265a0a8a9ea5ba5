package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/tests/vm"
)

const (
	adminSR        = "c0ffee00-1b1e-4c4d-9d5e-2a7f0c1e8b99"
	adminSecret    = "5d5e0c1a-1111-4222-8333-94445555aaaa"
	adminRecovery  = "admin-recovery-passphrase-e2e"
	adminRotated   = "admin-rotated-passphrase-e2e"
	adminWrongPass = "not-the-recovery-passphrase"
)

// luksextRun is one run of the installed operator command in the guest.
type luksextRun struct {
	Stdout, Stderr string
	Exit           int
}

// luksext runs /usr/sbin/luksext (the symlink make install creates) in
// the guest with stdin from the file stdin ("" for none).
func (g *guest) luksext(t *testing.T, stdin string, args ...string) luksextRun {
	t.Helper()
	if stdin == "" {
		stdin = "/dev/null"
	}
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	out, _ := g.Run(t, fmt.Sprintf(`%s/root/usr/sbin/luksext %s <%s >%s/luksext.out 2>%s/luksext.err; echo "EXIT=$?"`,
		g.work, strings.Join(quoted, " "), stdin, g.work, g.work))
	i := strings.LastIndex(out, "EXIT=")
	require.GreaterOrEqual(t, i, 0, out)
	code, err := strconv.Atoi(strings.TrimSpace(out[i+5:]))
	require.NoError(t, err, out)
	stdout, _ := os.ReadFile(filepath.Join(g.work, "luksext.out"))
	stderr, _ := os.ReadFile(filepath.Join(g.work, "luksext.err"))
	r := luksextRun{Stdout: string(stdout), Stderr: string(stderr), Exit: code}
	t.Logf("luksext %s → exit %d\n%s%s", strings.Join(args, " "), code, r.Stdout, r.Stderr)
	return r
}

type adminStatus struct {
	SRs []struct {
		UnlocksAutomatically bool `json:"unlocks_automatically"`
		RecoveryPassphrase   bool `json:"recovery_passphrase"`
		Keyslots             []struct {
			Keyslot int    `json:"keyslot"`
			Kind    string `json:"kind"`
			Unseals *bool  `json:"unseals"`
			Error   string `json:"error"`
			Policy  *struct {
				Pin    string `json:"pin"`
				PCRIDs string `json:"pcr_ids"`
			} `json:"policy"`
		} `json:"keyslots"`
	} `json:"srs"`
}

func (g *guest) adminStatus(t *testing.T) (adminStatus, int) {
	t.Helper()
	r := g.luksext(t, "", "status", adminSR, "--json")
	var st adminStatus
	require.NoError(t, json.Unmarshal([]byte(r.Stdout), &st), r.Stdout)
	require.Len(t, st.SRs, 1)
	return st, r.Exit
}

// tpmSlot is the keyslot of the (only) tpm2 binding.
func (g *guest) tpmSlot(t *testing.T) int {
	st, _ := g.adminStatus(t)
	for _, k := range st.SRs[0].Keyslots {
		if k.Kind == "binding" && k.Policy != nil && k.Policy.Pin == "tpm2" {
			return k.Keyslot
		}
	}
	t.Fatalf("no tpm2 binding: %+v", st)
	return -1
}

// TestAdminCommand is the "TPM refuses" story with the installed command,
// on one boot: SR.create (recovery passphrase, PCR 7) → PCR 7 changes →
// SR.attach fails → status says so → unlock (wrong, then right) → attach
// with no prompt → rebind with the recovery passphrase → attach with no
// prompt, and stock clevis opens the rebound disk → kill -9 in the middle
// of rebind and of recovery rotate, each followed by a check that a way in
// remains and a converging rerun → bad inputs (unknown SR, slots, a Tang
// server whose thumbprint does not match).
func TestAdminCommand(t *testing.T) {
	g := bootGuest(t, vm.Config{Disks: []int64{40 << 20}, TPM: true})
	g.startXAPI(t, map[string]string{adminSecret: adminRecovery})
	dev := "/dev/vda"
	recoveryKey := writeNamedKey(t, g, "recovery", adminRecovery)
	wrongKey := writeNamedKey(t, g, "wrong", adminWrongPass)
	rotatedKey := writeNamedKey(t, g, "rotated", adminRotated)
	// A way in exists: the recovery passphrase (either one) or the TPM.
	wayIn := func(t *testing.T, when string) {
		out, code := g.Run(t, fmt.Sprintf(`cryptsetup open --test-passphrase --key-file %s %s && echo recovery-ok
cryptsetup open --test-passphrase --key-file %s %s && echo rotated-ok
true`, recoveryKey, dev, rotatedKey, dev))
		require.Equal(t, 0, code)
		st, _ := g.adminStatus(t)
		assert.True(t, strings.Contains(out, "-ok") || st.SRs[0].UnlocksAutomatically, "%s: no way in left: %s %+v", when, out, st)
	}
	headerSlots := func(t *testing.T) string {
		return strings.TrimSpace(g.MustRun(t, fmt.Sprintf(`cryptsetup luksDump %s | grep -E '^  [0-9]+: luks2' | tr -d ' :' | sed 's/luks2//' | tr '\n' ,`, dev)))
	}

	var cfg map[string]string
	g.ok(t, "SR.create", createParams(adminSR, map[string]string{"device": dev, "tpm2-pcr-ids": "7", "recovery-password_secret": adminSecret}), &cfg)
	var sr string

	t.Run("PCR 7 changes: attach fails, status says why", func(t *testing.T) {
		g.MustRun(t, "tpm2_pcrextend 7:sha256="+strings.Repeat("01", 32))
		rec := g.fails(t, "SR.attach", attachParams(cfg), "Key_unavailable")
		assert.Contains(t, rec.Params[1], "luksext unlock")
		st, code := g.adminStatus(t)
		assert.Equal(t, 5, code)
		assert.False(t, st.SRs[0].UnlocksAutomatically)
		assert.True(t, st.SRs[0].RecoveryPassphrase)
		assert.False(t, *st.SRs[0].Keyslots[0].Unseals)
		text := g.luksext(t, "", "status")
		assert.Contains(t, text.Stdout, "does NOT unseal")
		assert.Contains(t, text.Stdout, "luksext unlock "+adminSR)
	})

	t.Run("unlock: wrong passphrase, then the right one, then attach", func(t *testing.T) {
		lockout := `tpm2_getcap properties-variable | grep -i -A1 lockoutCounter | tr -d '\n '`
		before := g.MustRun(t, lockout)
		r := g.luksext(t, wrongKey, "unlock", adminSR, "--key-file", "-")
		assert.Equal(t, 3, r.Exit)
		assert.Contains(t, r.Stderr, "stays locked")
		assert.NotContains(t, r.Stderr+r.Stdout, adminWrongPass)
		assert.Equal(t, before, g.MustRun(t, lockout), "the TPM dictionary-attack counter is untouched")
		assert.Equal(t, "", g.MustRun(t, "ls /dev/mapper | grep luksext || true"))
		r = g.luksext(t, "", "unlock", adminSR)
		assert.Equal(t, 5, r.Exit, "no terminal and no --key-file: no key")

		r = g.luksext(t, recoveryKey, "unlock", adminSR, "--key-file", "-")
		require.Equal(t, 0, r.Exit, r.Stderr)
		assert.Contains(t, r.Stdout, "xe pbd-plug")
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
	})

	t.Run("rebind with the recovery passphrase, then attach needs nothing", func(t *testing.T) {
		r := g.luksext(t, recoveryKey, "rebind", adminSR, "0", "--key-file", "-", "--json")
		require.Equal(t, 0, r.Exit, r.Stderr)
		var k struct {
			NewKeyslot   int    `json:"new_keyslot"`
			AuthorisedBy string `json:"authorised_by"`
		}
		require.NoError(t, json.Unmarshal([]byte(r.Stdout), &k))
		assert.Contains(t, k.AuthorisedBy, "recovery passphrase")
		st, code := g.adminStatus(t)
		assert.Equal(t, 0, code)
		assert.True(t, st.SRs[0].UnlocksAutomatically)
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)

		// Stock clevis opens the disk through our rebound token.
		g.MustRun(t, fmt.Sprintf("clevis luks unlock -d %s -n clevis-check && test -b /dev/mapper/clevis-check && cryptsetup close clevis-check", dev))
	})

	// Issue 16: XO sees trouble before a person does. With the recovery
	// passphrase kept for the fallback, a PCR change no longer fails the
	// attach: SR.stat then reports the SR degraded and a XAPI message is
	// posted on it; rebind makes it Healthy again (and says so).
	t.Run("fallback attach: SR.stat degraded and a XAPI message, until rebind", func(t *testing.T) {
		msgs := filepath.Join(g.work, "xapi-messages.jsonl")
		secrets := filepath.Join(g.work, "input-secrets")
		require.NoError(t, os.WriteFile(secrets, []byte(adminSecret+"="+adminRecovery+"\n"), 0o600))
		g.MustRun(t, fmt.Sprintf(`pkill -f fakexapi; rm -f /run/fakexapi.sock %[2]s
setsid %[1]s/bin/fakexapi -socket /run/fakexapi.sock -calls %[1]s/xapi-calls.log -messages %[2]s <%[3]s >/dev/null 2>&1 &
for i in $(seq 100); do [ -S /run/fakexapi.sock ] && exit 0; sleep 0.1; done; exit 1`, g.work, msgs, secrets))
		defer g.startXAPI(t, map[string]string{adminSecret: adminRecovery})
		readMsgs := func() []map[string]any {
			b, _ := os.ReadFile(msgs)
			var out []map[string]any
			for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
				if l != "" {
					var m map[string]any
					require.NoError(t, json.Unmarshal([]byte(l), &m))
					out = append(out, m)
				}
			}
			return out
		}
		withFallback := map[string]string{"recovery-fallback": "true", "recovery-password_secret": adminSecret}
		for k, v := range cfg {
			withFallback[k] = v
		}
		g.MustRun(t, "tpm2_pcrextend 7:sha256="+strings.Repeat("03", 32))
		g.ok(t, "SR.attach", attachParams(withFallback), &sr)
		var st struct {
			Health []string `json:"health"`
		}
		g.ok(t, "SR.stat", map[string]any{"dbg": "t", "sr": sr}, &st)
		require.Len(t, st.Health, 2)
		assert.Equal(t, "Healthy", st.Health[0], "the SR works: scans must not be refused")
		assert.Contains(t, st.Health[1], "Degraded: was opened with the recovery passphrase")
		m := readMsgs()
		require.Len(t, m, 1, "one message")
		assert.Equal(t, map[string]any{"name": "LUKSEXT_AUTO_UNLOCK_BROKEN", "priority": float64(3), "cls": "SR", "obj_uuid": adminSR}, map[string]any{"name": m[0]["name"], "priority": m[0]["priority"], "cls": m[0]["cls"], "obj_uuid": m[0]["obj_uuid"]})
		assert.Contains(t, m[0]["body"], "SR "+adminSR+" was opened with the recovery passphrase")
		assert.Contains(t, m[0]["body"], "luksext rebind "+adminSR)
		assert.NotContains(t, m[0]["body"], adminRecovery)

		// The operator rebinds while the SR is attached (the XAPI socket
		// given, as on a host).
		out, code := g.Run(t, fmt.Sprintf(`LUKSEXT_XAPI_SOCKET=/run/fakexapi.sock %s/root/usr/sbin/luksext rebind %s %d --key-file %s`, g.work, adminSR, g.tpmSlot(t), recoveryKey))
		require.Equal(t, 0, code, out)
		g.ok(t, "SR.stat", map[string]any{"dbg": "t", "sr": sr}, &st)
		assert.Equal(t, []string{"Healthy", ""}, st.Health)
		m = readMsgs()
		require.Len(t, m, 2)
		assert.Equal(t, "LUKSEXT_AUTO_UNLOCK_REPAIRED", m[1]["name"])
		assert.Equal(t, float64(4), m[1]["priority"])
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
	})

	// killAt starts a luksext run in the background, waits until the
	// header shows the change reached a step, kills it with SIGKILL and
	// reports the header then.
	killAt := func(t *testing.T, step, args, wait string) {
		out := g.MustRun(t, fmt.Sprintf(`before=$(cryptsetup luksDump %[1]s | grep -cE '^  [0-9]+: (luks2|clevis)')
setsid %[2]s/root/usr/sbin/luksext %[3]s >/dev/null 2>>%[2]s/luksext-killed.err &
pid=$!
for i in $(seq 6000); do %[4]s && break; kill -0 $pid 2>/dev/null || break; sleep 0.01; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
echo "killed at %[5]s: $(cryptsetup luksDump %[1]s | grep -E '^  [0-9]+: (luks2|clevis)' | tr -s ' ' | tr '\n' ';')"`,
			dev, g.work, args, wait, step))
		t.Log(strings.TrimSpace(out))
	}
	keyslotCount := fmt.Sprintf(`[ $(cryptsetup luksDump %s | grep -cE '^  [0-9]+: luks2') -gt 2 ]`, dev)
	tokenCount := fmt.Sprintf(`[ $(cryptsetup luksDump %s | grep -cE '^  [0-9]+: clevis') -gt 1 ]`, dev)

	t.Run("kill -9 during rebind, at each step, converges", func(t *testing.T) {
		for _, step := range []struct{ name, wait string }{{"new keyslot added", keyslotCount}, {"new binding stored", tokenCount}} {
			g.MustRun(t, "tpm2_pcrextend 7:sha256="+strings.Repeat("02", 32))
			slot := g.tpmSlot(t)
			killAt(t, step.name, fmt.Sprintf("rebind %s %d --key-file %s", adminSR, slot, recoveryKey), step.wait)
			wayIn(t, "after kill at "+step.name)
			r := g.luksext(t, recoveryKey, "rebind", adminSR, strconv.Itoa(slot), "--key-file", "-")
			require.Equal(t, 0, r.Exit, "rerun after kill at %s: %s", step.name, r.Stderr)
			st, code := g.adminStatus(t)
			assert.Equal(t, 0, code, step.name)
			assert.Len(t, st.SRs[0].Keyslots, 2, "%s: one binding and the recovery passphrase, no orphan keyslot: %s", step.name, headerSlots(t))
			assert.True(t, st.SRs[0].UnlocksAutomatically, step.name)
		}
	})

	t.Run("kill -9 during recovery rotate converges", func(t *testing.T) {
		killAt(t, "new passphrase keyslot added", fmt.Sprintf("recovery rotate %s --new-key-file %s", adminSR, rotatedKey), keyslotCount)
		wayIn(t, "after kill during rotate")
		r := g.luksext(t, "", "recovery", "rotate", adminSR, "--new-key-file", rotatedKey)
		require.Equal(t, 0, r.Exit, r.Stderr)
		_, code := g.Run(t, fmt.Sprintf("cryptsetup open --test-passphrase --key-file %s %s", rotatedKey, dev))
		assert.Equal(t, 0, code, "the new passphrase opens the disk")
		_, code = g.Run(t, fmt.Sprintf("cryptsetup open --test-passphrase --key-file %s %s", recoveryKey, dev))
		assert.NotEqual(t, 0, code, "the old one no longer does")
		st, _ := g.adminStatus(t)
		assert.Len(t, st.SRs[0].Keyslots, 2, headerSlots(t))
	})

	t.Run("bad inputs", func(t *testing.T) {
		assert.Equal(t, 4, g.luksext(t, "", "status", "9d0e0000-0000-4000-8000-000000000000").Exit, "unknown SR")
		assert.Equal(t, 4, g.luksext(t, "", "rebind", "9d0e0000-0000-4000-8000-000000000000", "0").Exit)
		assert.Equal(t, 4, g.luksext(t, "", "unbind", adminSR, "7").Exit, "keyslot not in use")
		st, _ := g.adminStatus(t)
		for _, k := range st.SRs[0].Keyslots {
			if k.Kind == "passphrase" {
				assert.Equal(t, 2, g.luksext(t, "", "unbind", adminSR, strconv.Itoa(k.Keyslot)).Exit, "a passphrase keyslot is not a binding")
			}
		}
		assert.Equal(t, 7, g.luksext(t, "", "recovery", "remove", adminSR).Exit, "only the TPM would remain")
		r := g.luksext(t, wrongKey, "recovery", "rotate", adminSR, "--key-file", "-", "--new-key-file", rotatedKey)
		assert.Equal(t, 0, r.Exit, "the TPM binding authorises; the key file is not even read")

		port := 20000 + rand.IntN(40000)
		g.MustRun(t, fmt.Sprintf(`rm -rf /tmp/tang && mkdir /tmp/tang && /usr/libexec/tangd-keygen /tmp/tang
setsid socat TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork EXEC:"/usr/libexec/tangd /tmp/tang" >/dev/null 2>&1 &
for i in $(seq 100); do curl -sf http://127.0.0.1:%d/adv >/dev/null && exit 0; sleep 0.1; done; exit 1`, port, port))
		before := headerSlots(t)
		r = g.luksext(t, "", "bind", adminSR, "tang", fmt.Sprintf(`{"url":"http://127.0.0.1:%d","thp":"%s"}`, port, strings.Repeat("A", 43)))
		assert.Equal(t, 8, r.Exit, r.Stderr)
		assert.Contains(t, r.Stderr, "thumbprint")
		assert.Equal(t, before, headerSlots(t), "nothing changed on the disk")
	})

	t.Run("attach after it all", func(t *testing.T) {
		g.ok(t, "SR.attach", attachParams(cfg), &sr)
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": sr}, nil)
		leaks := g.MustRun(t, fmt.Sprintf(`timeout 120 grep -rlsF -D skip -e %q -e %q /var/log /run/luksext /var/lib/luksext /root %s/luksext.out %s/luksext.err %s/luksext-killed.err 2>/dev/null || true`, adminRecovery, adminRotated, g.work, g.work, g.work))
		assert.Equal(t, "", strings.TrimSpace(leaks), "a passphrase leaked into these files")
		// Only where the command writes (logs, lock and journal dirs, its output):
		// a recursive grep of all of /run and /tmp did not finish within 10 minutes
		// under TCG (the 9p work share is under /tmp), and the test's own key files
		// live in the work dir.
	})
}

// writeNamedKey puts a passphrase in a file for the guest (the test's own
// input), with no trailing newline.
func writeNamedKey(t *testing.T, g *guest, name, pass string) string {
	p := filepath.Join(g.work, "keyfile-admin-"+name)
	require.NoError(t, os.WriteFile(p, []byte(pass), 0o600))
	return p
}

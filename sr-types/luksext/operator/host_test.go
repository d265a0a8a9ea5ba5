package operator

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/luksext/luksext/sr-types/luksext"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/clevis/tangtest"
	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/tpm/tpmtest"
)

// The host tier: real cryptsetup on an image file and a real swtpm, so
// every verb except unlock (which needs device-mapper: tests/e2e) runs
// here in seconds. The recovery keyslot uses a small real argon2id.
var fastRecoveryKDF = luks.KDF{Algorithm: "argon2id", Iterations: 4, MemoryKiB: 32 << 10, Parallel: 1}

const (
	hostSR       = "3e0c5a55-7d1f-4b8e-9a44-1b2c3d4e5f60"
	hostRecovery = "host-recovery-passphrase-42"
)

type hostFixture struct {
	t     *testing.T
	sw    *tpmtest.SWTPM
	deps  Deps
	img   string
	tools map[string]string
}

func newHostFixture(t *testing.T) *hostFixture {
	tools := testenv.Tools(t, "cryptsetup", "tpm2_pcrextend")
	testenv.Root(t)
	sw := tpmtest.Start(t)
	log := logrus.New()
	log.SetOutput(testLogWriter{t})
	log.SetLevel(logrus.DebugLevel)
	runner := run.NewExec(log)
	lm := luks.New(runner, log)
	keys := clevis.New(sw.Spec, log)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	require.NoError(t, os.Truncate(img, 32<<20))

	// The header SR.create writes (without the filesystem): keyslot 0
	// sealed to PCR 7, keyslot 1 the recovery passphrase.
	ctx := context.Background()
	pass, err := luks.NewKeyslotPassphrase()
	require.NoError(t, err)
	jwe, err := keys.Encrypt(ctx, clevis.Config{Pin: clevis.PinTPM2, TPM2: &clevis.TPM2Config{PCRIDs: clevis.PCRList{7}, PCRBank: "sha256"}}, pass)
	require.NoError(t, err)
	_, err = lm.Format(ctx, img, luks.FormatOptions{UUID: "11111111-2222-4333-8444-555555555555", Label: luks.SRName(hostSR), Passphrase: pass, Keyslot: 0, KDF: luks.MinimalKDF(), Force: true})
	require.NoError(t, err)
	require.NoError(t, lm.WriteMetadata(ctx, img, luks.Metadata{SRUUID: hostSR, State: luksext.StateReady}))
	require.NoError(t, lm.Bind(ctx, img, 0, jwe))
	_, err = lm.AddKeyslot(ctx, img, pass, secret.FromString(hostRecovery), 1, fastRecoveryKDF)
	require.NoError(t, err)

	empty := t.TempDir() // no disks to scan: SRs are named by path
	return &hostFixture{t: t, sw: sw, img: img, tools: tools, deps: Deps{
		SR:          luksext.SRDeps{LUKS: lm, Keys: keys, FS: fs.New(runner), MountRoot: filepath.Join(dir, "sr-mount"), StateDir: filepath.Join(dir, "run"), DevDir: empty},
		Run:         runner,
		JournalDir:  filepath.Join(dir, "journal"),
		RecoveryKDF: fastRecoveryKDF,
		Log:         log,
	}}
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// cli runs the command with --json and decodes stdout into out.
func (f *hostFixture) cli(stdin string, out any, args ...string) (int, string) {
	f.t.Helper()
	stdout, stderr, code := runCLI(f.t, f.deps, stdin, append(args, "--json")...)
	if out != nil {
		require.NoError(f.t, json.Unmarshal([]byte(stdout), out), "stdout: %s\nstderr: %s", stdout, stderr)
	}
	return code, stderr
}

func (f *hostFixture) status() (statusReport, int) {
	var st statusReport
	code, _ := f.cli("", &st, "status", f.img)
	require.Len(f.t, st.SRs, 1)
	return st, code
}

func (f *hostFixture) slots() []int {
	info, err := f.deps.SR.LUKS.Inspect(f.img)
	require.NoError(f.t, err)
	var ids []int
	for _, k := range info.Keyslots {
		ids = append(ids, k.ID)
	}
	return ids
}

// opens reports whether pass opens keyslot slot, checked with cryptsetup
// directly (independent of our code).
func (f *hostFixture) opens(pass string, slot int) bool {
	cmd := exec.Command(f.tools["cryptsetup"], "open", "--test-passphrase", "--key-file=-", "--key-slot", fmt.Sprint(slot), f.img)
	cmd.Stdin = strings.NewReader(pass)
	return cmd.Run() == nil
}

func (f *hostFixture) extendPCR7() {
	cmd := exec.Command(f.tools["tpm2_pcrextend"], "7:sha256="+strings.Repeat("ab", 32))
	cmd.Env = append(os.Environ(), f.sw.Env()...)
	out, err := cmd.CombinedOutput()
	require.NoError(f.t, err, "%s", out)
}

func TestAdminHostKeyLifecycle(t *testing.T) {
	f := newHostFixture(t)
	var tpmSlot int

	t.Run("status: the TPM binding unseals", func(t *testing.T) {
		st, code := f.status()
		assert.Equal(t, ExitOK, code)
		s := st.SRs[0]
		assert.Equal(t, hostSR, s.SRUUID)
		assert.Equal(t, "luksext-"+hostSR, s.Mapping)
		assert.True(t, s.RecoveryPassphrase)
		assert.True(t, s.UnlocksAutomatically)
		require.Len(t, s.Keyslots, 2)
		assert.Equal(t, "binding", s.Keyslots[0].Kind)
		assert.Equal(t, policyView{Pin: "tpm2", PCRBank: "sha256", PCRIDs: "7", Key: "ecc"}, *s.Keyslots[0].Policy)
		assert.True(t, *s.Keyslots[0].Unseals)
		assert.Equal(t, "passphrase", s.Keyslots[1].Kind)
		text, _, _ := runCLI(t, f.deps, "", "status", f.img)
		assert.Contains(t, text, "keyslot 0  tpm2 PCR 7 (sha256): unseals now")
		assert.Contains(t, text, "automatic unlock: yes")
	})

	t.Run("PCR 7 changes: status says so, exit 5", func(t *testing.T) {
		f.extendPCR7()
		st, code := f.status()
		assert.Equal(t, ExitKeyUnavailable, code)
		assert.False(t, st.SRs[0].UnlocksAutomatically)
		assert.False(t, *st.SRs[0].Keyslots[0].Unseals)
		assert.Contains(t, st.SRs[0].Keyslots[0].Error, "PCR")
		text, _, _ := runCLI(t, f.deps, "", "status", f.img)
		assert.Contains(t, text, "does NOT unseal")
		assert.Contains(t, text, "luksext unlock "+hostSR)
	})

	t.Run("rebind refusals change nothing", func(t *testing.T) {
		var e errorReport
		code, stderr := f.cli("not-the-passphrase\n", &e, "rebind", f.img, "0", "--key-file", "-")
		assert.Equal(t, ExitWrongPassphrase, code)
		assert.Equal(t, "Wrong_passphrase", e.Error.Kind)
		assert.Contains(t, stderr, "nothing was changed")
		assert.NotContains(t, stderr, "not-the-passphrase")
		code, _ = f.cli("", &e, "rebind", f.img, "0")
		assert.Equal(t, ExitKeyUnavailable, code, "no binding unseals and nobody to ask")
		code, _ = f.cli(hostRecovery, &e, "rebind", f.img, "5", "--key-file", "-")
		assert.Equal(t, ExitNotFound, code)
		code, _ = f.cli(hostRecovery, &e, "rebind", f.img, "1", "--key-file", "-")
		assert.Equal(t, ExitUsage, code, "keyslot 1 is the passphrase")
		code, _ = f.cli("", &e, "rebind", "9d0e0000-0000-4000-8000-000000000000", "0")
		assert.Equal(t, ExitNotFound, code)
		assert.Equal(t, []int{0, 1}, f.slots())
		_, err := os.Stat(filepath.Join(f.deps.JournalDir, "11111111-2222-4333-8444-555555555555.json"))
		assert.ErrorIs(t, err, os.ErrNotExist)
	})

	t.Run("rebind with the recovery passphrase", func(t *testing.T) {
		var k keyChange
		code, stderr := f.cli(hostRecovery+"\n", &k, "rebind", f.img, "0", "--key-file", "-")
		require.Equal(t, ExitOK, code, stderr)
		require.NotNil(t, k.NewKeyslot)
		tpmSlot = *k.NewKeyslot
		assert.Equal(t, []int{0}, k.OldKeyslots)
		assert.Equal(t, "recovery passphrase (keyslot 1)", k.AuthorisedBy)
		assert.Equal(t, "7", k.Policy.PCRIDs, "same policy")
		assert.ElementsMatch(t, []int{1, tpmSlot}, f.slots())
		st, code := f.status()
		assert.Equal(t, ExitOK, code)
		assert.True(t, st.SRs[0].UnlocksAutomatically)
		assert.True(t, f.opens(hostRecovery, 1), "recovery untouched")
	})

	t.Run("stock clevis reads the rebound token", func(t *testing.T) {
		tools := testenv.Tools(t, "clevis", "clevis-luks-pass", "clevis-decrypt-tpm2")
		_ = tools
		cmd := exec.Command(tools["clevis"], "luks", "pass", "-d", f.img, "-s", fmt.Sprint(tpmSlot))
		cmd.Env = append(os.Environ(), f.sw.Env()...)
		out, err := cmd.Output()
		f.sw.FlushAll(t)
		require.NoError(t, err)
		assert.True(t, f.opens(string(out), tpmSlot), "clevis' unsealed passphrase opens the new keyslot")
	})

	tang := tangtest.Start(t)
	var tangSlot int
	t.Run("bind tang: wrong thumbprint refused before any change, right one works", func(t *testing.T) {
		var e errorReport
		bad := fmt.Sprintf(`{"url":%q,"thp":"%s"}`, tang.URL, strings.Repeat("A", 43))
		code, stderr := f.cli("", &e, "bind", f.img, "tang", bad)
		assert.Equal(t, ExitInvalidConfig, code, stderr)
		assert.ElementsMatch(t, []int{1, tpmSlot}, f.slots())
		code, _ = f.cli("", &e, "bind", f.img, "tang", `{"url":"http://x"}`)
		assert.Equal(t, ExitInvalidConfig, code, "a Tang binding needs a thumbprint")

		var k keyChange
		code, stderr = f.cli("", &k, "bind", f.img, "tang", fmt.Sprintf(`{"url":%q,"thp":%q}`, tang.URL, tang.Thp))
		require.Equal(t, ExitOK, code, stderr)
		tangSlot = *k.NewKeyslot
		assert.Contains(t, k.AuthorisedBy, "tpm2", "authorised by the working TPM binding: no prompt")
		st, _ := f.status()
		var found bool
		for _, s := range st.SRs[0].Keyslots {
			if s.Keyslot == tangSlot {
				found = true
				assert.Equal(t, policyView{Pin: "tang", URL: tang.URL, Thp: tang.Thp}, *s.Policy)
				assert.True(t, *s.Unseals)
			}
		}
		assert.True(t, found)
	})

	t.Run("unbind and recovery remove keep a way in", func(t *testing.T) {
		var e errorReport
		code, stderr := f.cli("", &e, "recovery", "remove", f.img)
		assert.Equal(t, ExitOK, code, "tpm + tang unseal: two ways in remain; %s", stderr)
		assert.ElementsMatch(t, []int{tpmSlot, tangSlot}, f.slots())
		var k keyChange
		code, stderr = f.cli("", &k, "unbind", f.img, fmt.Sprint(tangSlot))
		require.Equal(t, ExitOK, code, stderr)
		code, stderr = f.cli("", &e, "unbind", f.img, fmt.Sprint(tpmSlot))
		assert.Equal(t, ExitRefused, code, "the last way in")
		assert.Contains(t, stderr, "--force")
		assert.Equal(t, []int{tpmSlot}, f.slots())
		code, _ = f.cli("", &k, "recovery", "set", f.img, "--new-key-file", "-")
		assert.Equal(t, ExitUsage, code, "empty new passphrase")
		code, stderr = f.cli(hostRecovery+"\n", &k, "recovery", "set", f.img, "--new-key-file", "-")
		require.Equal(t, ExitOK, code, stderr)
		rec := *k.NewKeyslot
		assert.True(t, f.opens(hostRecovery, rec))
		code, stderr = f.cli(hostRecovery+"\n", &k, "recovery", "set", f.img, "--new-key-file", "-")
		require.Equal(t, ExitOK, code, stderr)
		assert.False(t, k.Changed, "the same passphrase again changes nothing")
		code, _ = f.cli("", &e, "recovery", "remove", f.img)
		assert.Equal(t, ExitRefused, code, "only the TPM would remain")
	})

	t.Run("recovery rotate", func(t *testing.T) {
		newKey := filepath.Join(t.TempDir(), "new")
		require.NoError(t, os.WriteFile(newKey, []byte("rotated-recovery-passphrase\n"), 0o600))
		var k keyChange
		code, stderr := f.cli("", &k, "recovery", "rotate", f.img, "--new-key-file", newKey)
		require.Equal(t, ExitOK, code, stderr)
		assert.True(t, f.opens("rotated-recovery-passphrase", *k.NewKeyslot))
		for _, s := range f.slots() {
			assert.False(t, f.opens(hostRecovery, s), "the old passphrase opens nothing")
		}
	})

	t.Run("an interrupted change is finished or undone", func(t *testing.T) {
		a := &admin{Host: luksext.NewHost(f.deps.SR), Deps: f.deps}
		tg, err := a.resolve(f.img)
		require.NoError(t, err)
		ctx := context.Background()
		// Crash after adding a keyslot, before its binding: its passphrase
		// died with the process. It must go, the rest must stay.
		existing, _, err := a.authorise(ctx, tg)
		require.NoError(t, err)
		orphanPass, _ := luks.NewKeyslotPassphrase()
		free, _ := a.LUKS.FreeKeyslot(f.img)
		require.NoError(t, a.writeJournal(tg, keyJournal{Op: "rebind", New: free, Old: []int{tpmSlot}}))
		_, err = a.LUKS.AddKeyslot(ctx, f.img, existing, orphanPass, free, luks.MinimalKDF())
		require.NoError(t, err)
		st, _ := f.status()
		require.NotNil(t, st.SRs[0].InterruptedChange)
		var k keyChange
		code, stderr := f.cli("rotated-recovery-passphrase", &k, "recovery", "set", f.img, "--new-key-file", "-")
		require.Equal(t, ExitOK, code, stderr)
		require.NotNil(t, k.Settled)
		assert.Equal(t, "undone", k.Settled.Outcome)
		assert.NotContains(t, f.slots(), free)
		assert.Contains(t, f.slots(), tpmSlot)

		// Crash in the middle of an unbind: finished.
		before := f.slots()
		tg, _ = a.resolve(f.img)
		rec := passphraseSlots(tg.Info)
		require.Len(t, rec, 1)
		extra, err := a.LUKS.AddKeyslot(ctx, f.img, existing, secret.FromString("third-way-in-123"), -1, luks.MinimalKDF())
		require.NoError(t, err)
		require.NoError(t, a.writeJournal(tg, keyJournal{Op: "recovery remove", New: -1, Old: []int{extra}}))
		code, stderr = f.cli("rotated-recovery-passphrase", &k, "recovery", "set", f.img, "--new-key-file", "-")
		require.Equal(t, ExitOK, code, stderr)
		assert.Equal(t, "finished", k.Settled.Outcome)
		assert.Equal(t, before, f.slots())
		existing.Wipe()
	})

	t.Run("header backup and restore", func(t *testing.T) {
		dir := t.TempDir()
		backup := filepath.Join(dir, "hdr")
		var h headerReport
		code, stderr := f.cli("", &h, "header-backup", f.img, backup)
		require.Equal(t, ExitOK, code, stderr)
		assert.Contains(t, stderr, "WARNING")
		fi, err := os.Stat(backup)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o400), fi.Mode().Perm())
		var e errorReport
		code, _ = f.cli("", &e, "header-backup", f.img, backup)
		assert.Equal(t, ExitFailure, code, "never overwrites a backup")

		before := f.slots()
		var k keyChange
		code, stderr = f.cli("", &k, "bind", f.img, "tpm2", `{}`)
		require.Equal(t, ExitOK, code, stderr)
		code, stderr = f.cli("", &e, "header-restore", f.img, backup)
		assert.Equal(t, ExitRefused, code, "no terminal to confirm and no --yes")
		assert.Contains(t, stderr, "overwrites EVERY keyslot")
		assert.Contains(t, f.slots(), *k.NewKeyslot)
		code, stderr = f.cli("", &h, "header-restore", f.img, backup, "--yes")
		require.Equal(t, ExitOK, code, stderr)
		assert.Equal(t, before, f.slots(), "the keyslot added after the backup is gone")
		st, code := f.status()
		assert.Equal(t, ExitOK, code)
		assert.True(t, st.SRs[0].UnlocksAutomatically)
	})
}

// Seed 01's recipe: LUKS1, a passphrase in keyslot 0 and `clevis luks bind
// tpm2 '{}'` (luksmeta). The command reads it, rebinds it, and stock clevis
// reads what we wrote.
func TestAdminHostSeed01Disk(t *testing.T) {
	f := newHostFixture(t)
	tools := testenv.Tools(t, "clevis", "clevis-luks-bind", "clevis-encrypt-tpm2", "luksmeta")
	img := filepath.Join(t.TempDir(), "seed01.img")
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	require.NoError(t, os.Truncate(img, 32<<20))
	key := filepath.Join(t.TempDir(), "pass")
	require.NoError(t, os.WriteFile(key, []byte(hostRecovery), 0o600))
	sh := func(env []string, name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s %v: %s", name, args, out)
		return string(out)
	}
	sh(nil, f.tools["cryptsetup"], "luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000", "--key-file", key, img)
	sh(f.sw.Env(), tools["clevis"], "luks", "bind", "-y", "-d", img, "-k", key, "tpm2", "{}")
	f.sw.FlushAll(t)
	f.img = img

	st, code := f.status()
	require.Equal(t, ExitOK, code)
	s := st.SRs[0]
	assert.Equal(t, "", s.SRUUID, "not a luksext SR")
	assert.Equal(t, 1, s.LUKSVersion)
	assert.Equal(t, "luks-"+s.LUKSUUID, s.Mapping)
	require.Len(t, s.Keyslots, 2)
	assert.Equal(t, "passphrase", s.Keyslots[0].Kind)
	assert.Equal(t, "tpm2", s.Keyslots[1].Policy.Pin)
	assert.True(t, *s.Keyslots[1].Unseals)

	var k keyChange
	code, stderr := f.cli("", &k, "rebind", img, "1")
	require.Equal(t, ExitOK, code, stderr)
	assert.Contains(t, k.AuthorisedBy, "keyslot 1 (tpm2)")
	out := sh(f.sw.Env(), tools["clevis"], "luks", "pass", "-d", img, "-s", fmt.Sprint(*k.NewKeyslot))
	f.sw.FlushAll(t)
	assert.True(t, f.opens(out, *k.NewKeyslot), "stock clevis reads the luksmeta slot we wrote")
	assert.Equal(t, []int{0, *k.NewKeyslot}, f.slots())
}

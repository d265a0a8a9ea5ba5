// Package luksvm checks plugins/luks where this machine cannot: real
// dm-crypt mappings, a (v)TPM and udev, inside a QEMU guest (tests/vm).
//
// TestVM boots one guest with three disks and a vTPM, copies this test
// binary into the shared work directory and runs TestGuest inside it, so
// many checks share a single (slow, TCG) boot.
package luksvm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/tpm"
	"github.com/luksext/luksext/tests/vm"
)

// guestEnv marks the run inside the guest.
const guestEnv = "LUKSEXT_LUKSVM_GUEST"

func TestVM(t *testing.T) {
	m := vm.Start(t, vm.Config{Disks: []int64{48 << 20, 48 << 20, 48 << 20}, TPM: true})
	// dom0's cryptsetup builds, next to the test binary: testDMOpen
	// compares their mappings with ours.
	hostDir, _ := m.WorkDir()
	testenv.Dom0Tree(t, "cryptsetup-1.7.4", hostDir)
	testenv.Dom0Tree(t, "cryptsetup-2.0.3", hostDir)
	runInGuest(t, m, "^TestGuest$")
}

// runInGuest copies this test binary into the guest-visible work
// directory and runs the selected tests there.
func runInGuest(t *testing.T, m *vm.Machine, pattern string, extraArgs ...string) string {
	exe, err := os.Executable()
	require.NoError(t, err)
	hostDir, guestDir := m.WorkDir()
	bin := filepath.Join(hostDir, "luksvm.test")
	copyFile(t, exe, bin)
	script := fmt.Sprintf("modprobe dm_crypt && %s=1 %s -test.run '%s' -test.v -test.count=1 %s 2>&1",
		guestEnv, filepath.Join(guestDir, "luksvm.test"), pattern, strings.Join(extraArgs, " "))
	out, rc := m.Run(t, script)
	t.Log(out)
	require.Equal(t, 0, rc, "guest tests failed")
	require.Contains(t, out, "--- PASS: "+strings.Trim(pattern, "^$"))
	return out
}

func copyFile(t *testing.T, from, to string) {
	src, err := os.Open(from)
	require.NoError(t, err)
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
}

// inGuest skips outside the VM: these tests are driven by TestVM.
func inGuest(t *testing.T) {
	if os.Getenv(guestEnv) != "1" {
		t.Skip("runs inside the VM; started by TestVM")
	}
}

type env struct {
	ctx context.Context
	m   *luks.Manager
	cl  *clevis.Client
}

func newEnv(t *testing.T) env {
	log := logrus.New()
	log.SetOutput(testWriter{t})
	log.SetLevel(logrus.DebugLevel)
	return env{ctx: context.Background(), m: luks.New(run.NewExec(log), log), cl: clevis.New(tpm.Spec{Kind: tpm.KindDevice}, log)}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// sh runs a command in the guest; stdin carries any secret.
func sh(t *testing.T, stdin string, name string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.String(), ee.ExitCode()
	}
	require.NoError(t, err, name)
	return out.String(), 0
}

func mustSh(t *testing.T, stdin string, name string, args ...string) string {
	t.Helper()
	out, rc := sh(t, stdin, name, args...)
	require.Equal(t, 0, rc, "%s %v: %s", name, args, out)
	return out
}

// checksum reads the first MiB of the opened device.
func checksum(t *testing.T, path string) [32]byte {
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	buf := make([]byte, 1<<20)
	_, err = io.ReadFull(f, buf)
	require.NoError(t, err)
	return sha256.Sum256(buf)
}

func TestGuest(t *testing.T) {
	inGuest(t)
	e := newEnv(t)
	tpmCfg, err := clevis.ParseConfig("tpm2", []byte("{}"))
	require.NoError(t, err)

	t.Run("OurLUKS2_TPMUnlock_Recovery_Busy_ClevisUnlock", func(t *testing.T) {
		const dev, sr, uuid = "/dev/vda", "11111111-2222-4333-8444-555555555555", "a1a1a1a1-b2b2-4c3c-8d4d-e5e5e5e5e5e5"
		name := luks.SRName(sr)
		// What a cryptsetup 2.0.3 dom0 gets: the token written from Go.
		e.m.TokenWriter = luks.TokenWriterGo
		defer func() { e.m.TokenWriter = luks.TokenWriterAuto }()

		pass, err := luks.NewKeyslotPassphrase()
		require.NoError(t, err)
		jwe, err := e.cl.Encrypt(e.ctx, tpmCfg, pass)
		require.NoError(t, err)
		v, err := e.m.Format(e.ctx, dev, luks.FormatOptions{UUID: uuid, Label: name, Passphrase: pass.Clone(), KDF: luks.MinimalKDF()})
		require.NoError(t, err)
		require.Equal(t, 2, v)
		recovery := secret.FromString("guest recovery passphrase")
		recKDF := luks.RecoveryKDF()
		recKDF.IterTimeMS = 300 // TCG: keep the benchmark short, memory bound stays
		_, err = e.m.AddKeyslot(e.ctx, dev, pass, recovery, 1, recKDF)
		require.NoError(t, err)
		require.NoError(t, e.m.Bind(e.ctx, dev, 0, jwe))
		require.NoError(t, e.m.WriteMetadata(e.ctx, dev, luks.Metadata{SRUUID: sr, State: "ready"}))
		pass.Wipe()

		// SR.attach's path: find by UUID (udev), read binding, unseal, open.
		mustSh(t, "", "udevadm", "trigger", "--action=change", dev)
		mustSh(t, "", "udevadm", "settle")
		found, err := e.m.FindByUUID(uuid)
		require.NoError(t, err)
		require.Equal(t, dev, found)
		info, err := e.m.Inspect(found)
		require.NoError(t, err)
		require.Equal(t, sr, info.SRUUID())
		require.Len(t, info.Bindings, 1)
		key, err := e.cl.Decrypt(e.ctx, info.Bindings[0].JWE)
		require.NoError(t, err)
		require.NoError(t, e.m.Open(e.ctx, found, name, key, info.Bindings[0].Keyslot))
		require.NoError(t, e.m.Open(e.ctx, found, name, key, info.Bindings[0].Keyslot), "open again converges")
		key.Wipe()
		require.True(t, e.m.IsOpen(name))
		mapper := e.m.MapperPath(name)
		assert.Equal(t, "512", strings.TrimSpace(mustSh(t, "", "blockdev", "--getss", mapper)), "512-byte sectors for tapdisk")
		mustSh(t, "", "dd", "if=/dev/urandom", "of="+mapper, "bs=1M", "count=1", "oflag=direct", "status=none")
		sum := checksum(t, mapper)

		// Busy: mounted filesystem → ErrBusy; after umount close works, twice.
		mustSh(t, "", "mkfs.ext4", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", mapper)
		mustSh(t, "", "mkdir", "-p", "/run/luksvm-mnt")
		mustSh(t, "", "mount", mapper, "/run/luksvm-mnt")
		require.ErrorIs(t, e.m.Close(e.ctx, name), luks.ErrBusy)
		mustSh(t, "", "umount", "/run/luksvm-mnt")
		require.NoError(t, e.m.Close(e.ctx, name))
		require.NoError(t, e.m.Close(e.ctx, name))
		require.False(t, e.m.IsOpen(name))

		// The recovery passphrase opens the device with plain cryptsetup,
		// typed as an administrator would (newline-terminated).
		mustSh(t, string(recovery.Expose())+"\n", "cryptsetup", "open", dev, "recovered")
		assert.NotEqual(t, sum, checksum(t, "/dev/mapper/recovered"), "mkfs overwrote the first MiB")
		mustSh(t, "", "cryptsetup", "close", "recovered")

		// Wrong passphrase is classified.
		require.ErrorIs(t, e.m.Open(e.ctx, dev, name, secret.FromString("nope"), 0), luks.ErrWrongPassphrase)
		require.False(t, e.m.IsOpen(name))

		// Stock clevis opens our Go-written token with the TPM.
		mustSh(t, "", "clevis", "luks", "unlock", "-d", dev, "-n", "byclevis")
		mustSh(t, "", "blkid", "-p", "/dev/mapper/byclevis") // the ext4 we made
		require.NoError(t, e.m.Close(e.ctx, "byclevis"))
	})

	for _, tc := range []struct {
		dev     string
		version string
	}{{"/dev/vdb", "luks1"}, {"/dev/vdc", "luks2"}} {
		t.Run("ClevisBound_"+tc.version+"_OpenedByUs", func(t *testing.T) {
			// seed 01's recipe, with a fast PBKDF for the admin slot (TCG).
			mustSh(t, "admin", "cryptsetup", "luksFormat", "-q", "--type", tc.version, "--pbkdf", "pbkdf2",
				"--pbkdf-force-iterations", "1000", "--key-file=-", tc.dev)
			mustSh(t, "admin", "clevis", "luks", "bind", "-y", "-d", tc.dev, "-k", "-", "tpm2", "{}")
			bs, err := e.m.Bindings(tc.dev)
			require.NoError(t, err)
			require.Len(t, bs, 1)
			require.Equal(t, 1, bs[0].Keyslot)
			key, err := e.cl.Decrypt(e.ctx, bs[0].JWE)
			require.NoError(t, err)
			name := "seed01-" + tc.version
			require.NoError(t, e.m.Open(e.ctx, tc.dev, name, key, bs[0].Keyslot))
			key.Wipe()
			mustSh(t, "", "dd", "if=/dev/zero", "of="+e.m.MapperPath(name), "bs=64k", "count=1", "oflag=direct", "status=none")
			require.NoError(t, e.m.Close(e.ctx, name))
		})
	}

	t.Run("OurLUKS1_Luksmeta_ClevisUnlock_ForceAndErase", func(t *testing.T) {
		const dev = "/dev/vdb" // holds the clevis-made LUKS1 from above
		pass, err := luks.NewKeyslotPassphrase()
		require.NoError(t, err)
		opts := luks.FormatOptions{Version: 1, UUID: "c3c3c3c3-d4d4-4e5e-8f6f-a7a7a7a7a7a7", Passphrase: pass.Clone(), KDF: luks.MinimalKDF()}
		_, err = e.m.Format(e.ctx, dev, opts)
		require.ErrorIs(t, err, luks.ErrSignaturePresent)
		opts.Force = true
		_, err = e.m.Format(e.ctx, dev, opts)
		require.NoError(t, err)
		jwe, err := e.cl.Encrypt(e.ctx, tpmCfg, pass)
		require.NoError(t, err)
		require.NoError(t, e.m.Bind(e.ctx, dev, 0, jwe))
		mustSh(t, "", "clevis", "luks", "unlock", "-d", dev, "-n", "luks1byclevis")
		require.NoError(t, e.m.Close(e.ctx, "luks1byclevis"))

		require.NoError(t, e.m.Erase(e.ctx, dev))
		_, rc := sh(t, "", "cryptsetup", "luksDump", dev)
		assert.NotEqual(t, 0, rc)
		_, rc = sh(t, string(pass.Expose()), "cryptsetup", "open", "--test-passphrase", "--key-file=-", dev)
		assert.NotEqual(t, 0, rc, "nothing opens an erased device")
	})

	t.Run("DMOpenMatchesCryptsetup", func(t *testing.T) { testDMOpen(t, "/dev/vdc") })
	t.Run("KernelMountOfADeviceMapperLink", testKernelMount)
}

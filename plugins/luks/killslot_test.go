package luks

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/testenv"
)

// TestRemoveLUKS1KeyslotReadByEveryCryptsetup destroys a LUKS1 keyslot in
// Go (what dom0's cryptsetup 1.7.4 cannot do without another passphrase)
// and has each cryptsetup generation read the result: luksDump of 1.7.4,
// 2.0.3 and the host's shows the slot DISABLED and the other ENABLED, the
// removed passphrase no longer opens the device, the other one does, and
// the freed slot is reused by luksAddKey. A kill between the two writes
// (material wiped, header not yet) converges on the next call.
func TestRemoveLUKS1KeyslotReadByEveryCryptsetup(t *testing.T) {
	m := realManager(t)
	ctx := context.Background()
	dir := t.TempDir()
	dumpers := map[string]string{"host": "cryptsetup"}
	for _, v := range []string{"1.7.4", "2.0.3"} {
		dumpers[v] = filepath.Join(testenv.Dom0Tree(t, "cryptsetup-"+v, dir), "sbin", "cryptsetup")
		assert.Equal(t, "cryptsetup "+v, strings.TrimSpace(sh(t, "", dumpers[v], "--version")))
	}
	slotState := func(t *testing.T, img string, slot string) {
		t.Helper()
		for v, bin := range dumpers {
			dump := sh(t, "", bin, "luksDump", img)
			assert.Regexp(t, regexp.MustCompile(`Key Slot 0: ENABLED`), dump, v)
			assert.Regexp(t, regexp.MustCompile(`Key Slot `+slot+`: DISABLED`), dump, v)
			assert.Equal(t, 1, strings.Count(dump, ": ENABLED"), "%s: exactly one slot left\n%s", v, dump)
		}
	}

	keep, drop := secret.FromString("kept passphrase"), secret.FromString("dropped passphrase")
	img := formatted(t, m, 1, keep)
	slot, err := m.AddKeyslot(ctx, img, keep, drop, -1, MinimalKDF())
	require.NoError(t, err)
	require.Equal(t, 1, slot)
	require.NoError(t, m.TestKeyslot(ctx, img, drop, 1))
	before, err := os.ReadFile(img)
	require.NoError(t, err)

	require.NoError(t, m.RemoveKeyslot(ctx, img, 1))
	slotState(t, img, "1")
	require.ErrorIs(t, m.TestKeyslot(ctx, img, drop, -1), ErrWrongPassphrase)
	require.NoError(t, m.TestKeyslot(ctx, img, keep, 0))
	after, err := os.ReadFile(img)
	require.NoError(t, err)
	h, err := readHeader(img)
	require.NoError(t, err)
	ks := h.v1.Keyslots[1]
	area := int64(ks.KeyMaterialOffset) * 512
	assert.NotEqual(t, before[area:area+4096], after[area:area+4096], "the key material was overwritten")
	assert.Equal(t, uint32(luks1KeyslotOffVal), ks.Active)
	assert.Zero(t, ks.Iterations)
	assert.Equal(t, [32]byte{}, ks.Salt)
	assert.Equal(t, before[h.dataOffset-4096:], after[h.dataOffset-4096:], "nothing written past the key material")
	require.NoError(t, m.RemoveKeyslot(ctx, img, 1), "removing it again converges")

	slot, err = m.AddKeyslot(ctx, img, keep, drop, -1, MinimalKDF())
	require.NoError(t, err)
	require.Equal(t, 1, slot, "the freed slot is reused")
	require.NoError(t, m.TestKeyslot(ctx, img, drop, 1))

	// Killed after the material wipe, before the header write: the slot
	// is dead already, and the replay finishes it.
	f := openRW(t, img)
	_, err = f.WriteAt(make([]byte, 512), int64(ks.KeyMaterialOffset)*512)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	require.ErrorIs(t, m.TestKeyslot(ctx, img, drop, 1), ErrWrongPassphrase)
	require.NoError(t, m.RemoveKeyslot(ctx, img, 1))
	slotState(t, img, "1")
	require.NoError(t, m.TestKeyslot(ctx, img, keep, 0), "always a way in")
}

// TestLUKS1HeaderBackupKeepsBindings: with each cryptsetup generation,
// luksHeaderBackup + CompleteHeaderBackup saves the clevis bindings
// (luksmeta) with the keyslots, and luksHeaderRestore + RestoreHeaderRest
// brings both back after an unbind.
func TestLUKS1HeaderBackupKeepsBindings(t *testing.T) {
	m := realManager(t)
	ctx := context.Background()
	dir := t.TempDir()
	tools := map[string]string{"host": "cryptsetup"}
	for _, v := range []string{"1.7.4", "2.0.3"} {
		tools[v] = filepath.Join(testenv.Dom0Tree(t, "cryptsetup-"+v, dir), "sbin", "cryptsetup")
	}
	const jwe = "eyJhbGciOiJkaXIifQ..aXY.Y3Q.dGFn"
	for v, cs := range tools {
		t.Run(v, func(t *testing.T) {
			pass, other := secret.FromString("kept passphrase"), secret.FromString("bound key")
			img := formatted(t, m, 1, pass)
			slot, err := m.AddKeyslot(ctx, img, pass, other, -1, MinimalKDF())
			require.NoError(t, err)
			require.NoError(t, m.Bind(ctx, img, slot, jwe))
			backup := filepath.Join(t.TempDir(), "hdr")
			sh(t, "", cs, "luksHeaderBackup", "--batch-mode", img, "--header-backup-file", backup)
			plain, err := os.Stat(backup)
			require.NoError(t, err)
			require.NoError(t, m.CompleteHeaderBackup(img, backup))
			info, err := m.Inspect(backup)
			require.NoError(t, err, "the completed backup reads like the device (cryptsetup wrote %d bytes)", plain.Size())
			require.Len(t, info.Bindings, 1)

			require.NoError(t, m.Unbind(ctx, img, slot))
			require.NoError(t, m.RemoveKeyslot(ctx, img, slot))
			bs, err := m.Bindings(img)
			require.NoError(t, err)
			require.Empty(t, bs)

			sh(t, "", cs, "luksHeaderRestore", "--batch-mode", img, "--header-backup-file", backup)
			restored, err := m.RestoreHeaderRest(img, backup)
			require.NoError(t, err)
			assert.True(t, restored)
			bs, err = m.Bindings(img)
			require.NoError(t, err)
			require.Len(t, bs, 1, "the binding came back with its keyslot")
			assert.Equal(t, slot, bs[0].Keyslot)
			assert.Equal(t, jwe, bs[0].JWE)
			require.NoError(t, m.TestKeyslot(ctx, img, other, slot))
			dump := sh(t, "", cs, "luksDump", img)
			assert.Contains(t, dump, fmt.Sprintf("Key Slot %d: ENABLED", slot), v)
		})
	}
}

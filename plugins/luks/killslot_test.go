package luks

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/tests/testenv"
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
